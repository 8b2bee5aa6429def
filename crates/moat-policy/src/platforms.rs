//! `[telegram]` (and, as they are built, the other chat apps' sections): how
//! moat reaches the platform. Secrets are never here: `TELEGRAM_BOT_TOKEN`
//! and `TELEGRAM_WEBHOOK_SECRET` come from the environment or the secrets
//! file.
//!
//! Must never: accept a secret in the file, or an `http://` API URL for a
//! host other than loopback (the bot token travels in every request).

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
