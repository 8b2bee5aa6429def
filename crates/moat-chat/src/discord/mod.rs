//! Discord: the Gateway (a WebSocket moat opens, so there is no inbound
//! delivery to forge), `MESSAGE_CREATE` read into what moat acts on, the
//! REST client with Discord's rate-limit buckets, and answers made safe for
//! Discord's Markdown. See `docs/discord.md`. Nothing here decides who may
//! talk or stores a message; the bot token is held as
//! [`moat_creds::Secret`] and never shown.

mod api;
pub mod format;
pub mod gateway;
mod message;
mod routes;

pub use api::{is_thread, BotUser, ChannelInfo, DiscordError, RestApi, DEFAULT_API_URL};
pub use message::{
    parse_click, parse_message, snowflake_ms, Click, DcMessage, Incoming, MessageError,
};
