//! Telegram: the webhook's secret token check, updates read into what moat
//! acts on, the Bot API client, and answers formatted as Telegram HTML. See
//! `docs/telegram.md`. Nothing here decides who may talk or stores an
//! update; the token and the webhook secret are held as
//! [`moat_creds::Secret`] and never shown.

mod api;
pub mod format;
mod update;

pub use api::{BotApi, TelegramError, DEFAULT_API_URL};
pub use update::{parse_update, BotIdentity, Incoming, TgMessage, UpdateError};

/// The header Telegram sets on webhook deliveries (`setWebhook`'s
/// `secret_token`).
pub const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";

/// Is `given` the webhook secret? Compared in constant time (for secrets of
/// equal length; the length is not secret: Telegram allows 1-256).
pub fn secret_matches(secret: &moat_creds::Secret, given: &[u8]) -> bool {
    let want = secret.expose().as_bytes();
    if want.is_empty() || want.len() != given.len() {
        return false;
    }
    want.iter()
        .zip(given)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_compare() {
        let s = moat_creds::Secret::new("s3cr3t-token_A");
        assert!(secret_matches(&s, b"s3cr3t-token_A"));
        assert!(!secret_matches(&s, b"s3cr3t-token_B"));
        assert!(!secret_matches(&s, b""));
        assert!(!secret_matches(&moat_creds::Secret::new(""), b""));
    }
}
