//! Start-up of the Slack front-end: the secrets it needs (named when
//! missing), `auth.test` for the bot's own id, the replier, the Events API
//! route and Socket Mode.

use std::future::Future;
use std::sync::Arc;

use moat_chat::slack::{socket, ApiConfig, Verifier, WebApi};
use moat_creds::Secret;
use moat_policy::gateway::{SlackConfig, SlackMode};

use crate::pipeline::Gateway;
use crate::server::ServeError;
use crate::slack::{handle_callback, SlackIn, SlackReplier};

/// A connected Slack front-end.
pub struct Slack {
    pub mode: SlackMode,
    pub replier: Arc<SlackReplier>,
    pub bot_user: String,
    verifier: Option<Arc<Verifier>>,
    app_token: Option<Secret>,
    api: ApiConfig,
}

fn need(
    secret: &dyn Fn(&str) -> Option<String>,
    var: &str,
    why: &str,
) -> Result<Secret, ServeError> {
    match secret(var) {
        Some(v) if !v.trim().is_empty() => Ok(Secret::new(v.trim().to_string())),
        _ => Err(ServeError::Config(format!(
            "slack.mode = \"{why}\" needs {var} in moat's environment or secrets file"
        ))),
    }
}

/// Connects when `slack.mode` is not `off`: checks the bot token with
/// `auth.test`, so a wrong token stops moat at start with Slack's reason.
pub async fn connect(
    cfg: &SlackConfig,
    secret: &(dyn Fn(&str) -> Option<String> + Sync),
) -> Result<Option<Slack>, ServeError> {
    let mode_name = match cfg.mode {
        SlackMode::Off => return Ok(None),
        SlackMode::Events => "events",
        SlackMode::Socket => "socket",
    };
    let bot = need(secret, "SLACK_BOT_TOKEN", mode_name)?;
    let verifier = match cfg.mode {
        SlackMode::Events => Some(Arc::new(Verifier::new(&need(
            secret,
            "SLACK_SIGNING_SECRET",
            mode_name,
        )?))),
        _ => None,
    };
    let app_token = match cfg.mode {
        SlackMode::Socket => Some(need(secret, "SLACK_APP_TOKEN", mode_name)?),
        _ => None,
    };
    // The configuration allows http:// only for a loopback host (tests).
    let api = ApiConfig::new(&cfg.api_url, cfg.api_url.starts_with("http://"))
        .map_err(|e| ServeError::Config(format!("slack.api_url: {e}")))?;
    let web = WebApi::new(api.clone(), bot);
    let me = web.auth_test().await.map_err(|e| {
        ServeError::Config(format!("Slack refused SLACK_BOT_TOKEN (auth.test): {e}"))
    })?;
    tracing::info!(bot_user = %me.user_id, "connected to Slack");
    Ok(Some(Slack {
        mode: cfg.mode,
        replier: Arc::new(SlackReplier::new(web)),
        bot_user: me.user_id,
        verifier,
        app_token,
        api,
    }))
}

impl Slack {
    /// `POST /slack/events`, in Events mode.
    pub fn events_router(&self, gw: &Gateway) -> Option<axum::Router> {
        let verifier = self.verifier.clone()?;
        Some(crate::slack::router(SlackIn {
            gw: gw.clone(),
            verifier,
            bot_user: Some(self.bot_user.clone()),
        }))
    }

    /// Socket Mode's connection, in Socket mode: each envelope is stored
    /// through the gateway before it is acknowledged.
    pub fn socket_mode(
        &self,
        gw: &Gateway,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let token = self.app_token.clone()?;
        let api = self.api.clone();
        let gw = gw.clone();
        let bot = self.bot_user.clone();
        Some(tokio::spawn(async move {
            let handler = |ev: socket::SocketEvent| {
                let gw = gw.clone();
                let bot = bot.clone();
                async move {
                    if ev.interactive {
                        crate::slack_approvals::socket_click(&gw, &ev.payload);
                        return Ok(());
                    }
                    handle_callback(&gw, Some(&bot), &ev.payload)
                        .await
                        .map(drop)
                        .map_err(|(_, msg)| msg)
                }
            };
            if let Err(e) = socket::run(token, &api, handler, stop).await {
                tracing::error!(error = %e, "Slack Socket Mode stopped");
            }
        }))
    }
}
