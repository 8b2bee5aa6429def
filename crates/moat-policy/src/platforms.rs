//! `[telegram]`, `[whatsapp]` and `[discord]`: how moat reaches each chat
//! app. Secrets are never here: `TELEGRAM_BOT_TOKEN`,
//! `TELEGRAM_WEBHOOK_SECRET`, `WHATSAPP_*` and `DISCORD_BOT_TOKEN` come from
//! the environment or the secrets file.
//!
//! Must never: accept a secret in the file, or an `http://` API URL (or a
//! `ws://` gateway URL) for a host other than loopback (the bot token
//! travels in every request).

use serde::Deserialize;

use crate::PolicyError;

pub const DEFAULT_TELEGRAM_API_URL: &str = "https://api.telegram.org";

/// How Telegram's updates reach moat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TelegramMode {
    Off,
    /// `POST /telegram/webhook` on `web.listen` (needs a public HTTPS
    /// address in front and `TELEGRAM_WEBHOOK_SECRET`).
    Webhook,
    /// `getUpdates` long polling: no public address needed.
    Polling,
}

impl TelegramMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Webhook => "webhook",
            Self::Polling => "polling",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelegramConfig {
    pub mode: TelegramMode,
    /// The Bot API's base, without a trailing slash.
    pub api_url: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTelegram {
    mode: Option<String>,
    api_url: Option<String>,
    bot_token: Option<toml::Value>,
    webhook_secret: Option<toml::Value>,
}

pub(crate) fn telegram(
    raw: RawTelegram,
    api_url: impl Fn(&str, &str) -> Result<String, PolicyError>,
) -> Result<TelegramConfig, PolicyError> {
    let err = |key: &str, message: String| PolicyError::Invalid {
        key: key.into(),
        message,
    };
    for (present, k, var) in [
        (
            raw.bot_token.is_some(),
            "telegram.bot_token",
            "TELEGRAM_BOT_TOKEN",
        ),
        (
            raw.webhook_secret.is_some(),
            "telegram.webhook_secret",
            "TELEGRAM_WEBHOOK_SECRET",
        ),
    ] {
        if present {
            return Err(err(
                k,
                format!("secrets never go in the configuration file; set {var} in moat's environment or the secrets file"),
            ));
        }
    }
    let mode = match raw.mode.as_deref().unwrap_or("off") {
        "off" => TelegramMode::Off,
        "webhook" => TelegramMode::Webhook,
        "polling" => TelegramMode::Polling,
        other => {
            return Err(err(
                "telegram.mode",
                format!("unknown mode {other:?}; use \"webhook\", \"polling\" or \"off\""),
            ))
        }
    };
    let api_url = api_url(
        raw.api_url.as_deref().unwrap_or(DEFAULT_TELEGRAM_API_URL),
        "telegram.api_url",
    )?;
    Ok(TelegramConfig { mode, api_url })
}

pub const DEFAULT_WHATSAPP_API_URL: &str = "https://graph.facebook.com/v21.0";

/// `[whatsapp]`: the Cloud API webhook (`GET`/`POST /whatsapp/webhook` on
/// `web.listen`) and the Graph API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhatsAppConfig {
    pub enabled: bool,
    /// The Graph API base with its version, without a trailing slash.
    pub api_url: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWhatsApp {
    enabled: Option<bool>,
    api_url: Option<String>,
    token: Option<toml::Value>,
    app_secret: Option<toml::Value>,
    verify_token: Option<toml::Value>,
}

pub(crate) fn whatsapp(
    raw: RawWhatsApp,
    api_url: impl Fn(&str, &str) -> Result<String, PolicyError>,
) -> Result<WhatsAppConfig, PolicyError> {
    for (present, k, var) in [
        (raw.token.is_some(), "whatsapp.token", "WHATSAPP_TOKEN"),
        (
            raw.app_secret.is_some(),
            "whatsapp.app_secret",
            "WHATSAPP_APP_SECRET",
        ),
        (
            raw.verify_token.is_some(),
            "whatsapp.verify_token",
            "WHATSAPP_VERIFY_TOKEN",
        ),
    ] {
        if present {
            return Err(PolicyError::Invalid {
                key: k.into(),
                message: format!("secrets never go in the configuration file; set {var} in moat's environment or the secrets file"),
            });
        }
    }
    Ok(WhatsAppConfig {
        enabled: raw.enabled.unwrap_or(false),
        api_url: api_url(
            raw.api_url.as_deref().unwrap_or(DEFAULT_WHATSAPP_API_URL),
            "whatsapp.api_url",
        )?,
    })
}

pub const DEFAULT_DISCORD_API_URL: &str = "https://discord.com/api/v10";
pub const DEFAULT_DISCORD_GATEWAY_URL: &str = "wss://gateway.discord.gg";

/// `[discord]`: the Gateway (a WebSocket moat opens; no inbound address)
/// and the REST API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscordConfig {
    pub enabled: bool,
    /// The REST API base with its version, without a trailing slash.
    pub api_url: String,
    /// The Gateway's `wss://` URL, without a query or trailing slash.
    pub gateway_url: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDiscord {
    enabled: Option<bool>,
    api_url: Option<String>,
    gateway_url: Option<String>,
    bot_token: Option<toml::Value>,
    token: Option<toml::Value>,
}

pub(crate) fn discord(
    raw: RawDiscord,
    api_url: impl Fn(&str, &str) -> Result<String, PolicyError>,
) -> Result<DiscordConfig, PolicyError> {
    for (present, k) in [
        (raw.bot_token.is_some(), "discord.bot_token"),
        (raw.token.is_some(), "discord.token"),
    ] {
        if present {
            return Err(PolicyError::Invalid {
                key: k.into(),
                message: "secrets never go in the configuration file; set DISCORD_BOT_TOKEN in moat's environment or the secrets file".into(),
            });
        }
    }
    let rest = api_url(
        raw.api_url.as_deref().unwrap_or(DEFAULT_DISCORD_API_URL),
        "discord.api_url",
    )?;
    // The gateway URL is checked as its HTTP twin (wss ~ https, ws ~ http:
    // plain only for a loopback host), and keeps its own scheme.
    let key = "discord.gateway_url";
    let given = raw
        .gateway_url
        .as_deref()
        .unwrap_or(DEFAULT_DISCORD_GATEWAY_URL)
        .trim();
    let bad = |message: String| PolicyError::Invalid {
        key: key.into(),
        message,
    };
    let (http, tail) = if let Some(r) = given.strip_prefix("wss://") {
        ("https://", r)
    } else if let Some(r) = given.strip_prefix("ws://") {
        ("http://", r)
    } else {
        return Err(bad(format!(
            "{given:?} is not a WebSocket URL; write wss://host[:port], e.g. \"{DEFAULT_DISCORD_GATEWAY_URL}\""
        )));
    };
    if tail.contains(['?', '#']) {
        return Err(bad(format!(
            "{given:?} has a query; moat adds ?v=10&encoding=json itself"
        )));
    }
    let checked = api_url(&format!("{http}{tail}"), key).map_err(|_| {
        bad(format!(
            "{given:?} is not usable; write wss://host[:port] (ws:// only for a loopback host: the token is sent on it)"
        ))
    })?;
    let gateway_url = format!(
        "{}{}",
        if http == "https://" {
            "wss://"
        } else {
            "ws://"
        },
        &checked[http.len()..]
    );
    Ok(DiscordConfig {
        enabled: raw.enabled.unwrap_or(false),
        api_url: rest,
        gateway_url,
    })
}
