//! Slack: request signatures, Events API callbacks, the Web API client and
//! Socket Mode. See `docs/slack.md` for what is implemented and the app's
//! set-up. Nothing here decides who may talk or stores an event; tokens and
//! the signing secret are held as [`moat_creds::Secret`] and never shown.

mod events;
pub mod socket;
pub(crate) mod transport;
mod verify;
mod web;

pub use events::{
    parse_callback, retry_info, Callback, EventCallback, FileRef, IgnoreReason, Inbound,
    InboundMessage, ParseError, RetryInfo, ThreadKey,
};
pub use verify::{
    sign, verify_request, SignatureError, Verifier, MAX_SKEW_SECS, SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
};
pub use web::{
    ApiConfig, AuthTest, Message, SleepFn, WebApi, WebApiError, DEFAULT_API_URL,
    DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_RETRY_AFTER, DEFAULT_TIMEOUT,
};
