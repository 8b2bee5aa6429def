//! The Discord REST endpoints moat uses: `GET /users/@me`,
//! `GET /channels/{id}`, `POST /channels/{id}/messages` (JSON with an
//! enforced nonce, with buttons, or multipart with a file), `PATCH` of the
//! bot's message, `POST /channels/{id}/typing`, the bot's own reaction and
//! the answer to a button click.
//!
//! Must never: put an id that is not a snowflake (or a token with
//! characters a path cannot carry) into a path, or send a message that may
//! mention anyone (`allowed_mentions = {"parse": []}` on every one).

use bytes::Bytes;
use hyper::Method;
use serde::Deserialize;
use serde_json::json;

use super::api::{
    decode, encode_segment, rand_u64, snowflake, BotUser, Call, ChannelInfo, DiscordError, RestApi,
    TIMEOUT,
};

impl RestApi {
    /// `GET /users/@me`: the bot's id and name (checks the token).
    pub async fn me(&self) -> Result<BotUser, DiscordError> {
        #[derive(Deserialize)]
        struct Me {
            id: String,
            #[serde(default)]
            username: String,
        }
        let route = "GET /users/@me";
        let call = Call {
            route,
            method: Method::GET,
            path: "/users/@me".into(),
            major: "",
        };
        let v = self.json(call, None).await?;
        let me: Me = decode(route, v)?;
        Ok(BotUser {
            id: me.id,
            username: me.username,
        })
    }

    /// `GET /channels/{id}`: its type and parent (a thread's channel).
    pub async fn channel(&self, id: &str) -> Result<ChannelInfo, DiscordError> {
        let route = "GET /channels/{channel}";
        snowflake(route, id)?;
        let call = Call {
            route,
            method: Method::GET,
            path: format!("/channels/{id}"),
            major: id,
        };
        let v = self.json(call, None).await?;
        decode(route, v)
    }

    /// `POST /channels/{id}/messages` with `content` (already formatted, at
    /// most 2,000 characters), replying to `reply_to` when given. Mentions
    /// are never parsed. Returns the new message's id.
    pub async fn send_message(
        &self,
        channel: &str,
        content: &str,
        reply_to: Option<&str>,
    ) -> Result<String, DiscordError> {
        self.send_message_once(channel, content, reply_to, None)
            .await
    }

    /// [`RestApi::send_message`] with the caller's `nonce` (at most 25
    /// characters): Discord returns the message already created with it in
    /// the last few minutes instead of posting it again (a redelivery after
    /// a restart).
    pub async fn send_message_once(
        &self,
        channel: &str,
        content: &str,
        reply_to: Option<&str>,
        nonce: Option<&str>,
    ) -> Result<String, DiscordError> {
        self.post_message(channel, content, reply_to, nonce, None)
            .await
    }

    /// A message with message components (moat's buttons).
    pub async fn send_with_components(
        &self,
        channel: &str,
        content: &str,
        components: serde_json::Value,
    ) -> Result<String, DiscordError> {
        self.post_message(channel, content, None, None, Some(components))
            .await
    }

    async fn post_message(
        &self,
        channel: &str,
        content: &str,
        reply_to: Option<&str>,
        nonce: Option<&str>,
        components: Option<serde_json::Value>,
    ) -> Result<String, DiscordError> {
        let route = "POST /channels/{channel}/messages";
        snowflake(route, channel)?;
        // One nonce for the call, kept by its retries: a retry after a 5xx
        // that Discord had in fact acted on returns the message already
        // created instead of sending it twice.
        let nonce = match nonce {
            Some(n) if !n.is_empty() && n.chars().count() <= 25 => n.to_string(),
            _ => rand_u64().to_string(),
        };
        let mut body = json!({
            "content": content,
            "allowed_mentions": {"parse": [], "replied_user": false},
            "flags": 4, // SUPPRESS_EMBEDS: no link previews.
            "nonce": nonce,
            "enforce_nonce": true,
        });
        if let Some(m) = reply_to {
            snowflake(route, m)?;
            body["message_reference"] = json!({"message_id": m, "fail_if_not_exists": false});
        }
        if let Some(c) = components {
            body["components"] = c;
        }
        let call = Call {
            route,
            method: Method::POST,
            path: format!("/channels/{channel}/messages"),
            major: channel,
        };
        let v = self.json(call, Some(body)).await?;
        v.get("id")
            .and_then(|i| i.as_str())
            .map(str::to_string)
            .ok_or(DiscordError::BadResponse {
                route,
                reason: "no message id".into(),
            })
    }

    /// `PATCH /channels/{id}/messages/{id}`: the bot's message's new
    /// content, its buttons taken off.
    pub async fn edit_message(
        &self,
        channel: &str,
        message: &str,
        content: &str,
    ) -> Result<(), DiscordError> {
        let route = "PATCH /channels/{channel}/messages/{message}";
        snowflake(route, channel)?;
        snowflake(route, message)?;
        let body = json!({"content": content, "components": [],
            "allowed_mentions": {"parse": []}});
        let call = Call {
            route,
            method: Method::PATCH,
            path: format!("/channels/{channel}/messages/{message}"),
            major: channel,
        };
        self.json(call, Some(body)).await.map(|_| ())
    }

    /// `POST /interactions/{id}/{token}/callback`: the answer to a button
    /// click (within 3 s). `body` is the interaction response.
    pub async fn interaction_callback(
        &self,
        id: &str,
        token: &str,
        body: serde_json::Value,
    ) -> Result<(), DiscordError> {
        let route = "POST /interactions/{id}/{token}/callback";
        snowflake(route, id)?;
        // The token is Discord's, in the path: kept to URL-safe characters.
        let ok = !token.is_empty()
            && token.len() <= 512
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !ok {
            return Err(DiscordError::BadResponse {
                route,
                reason: "an interaction token with characters a path cannot carry".into(),
            });
        }
        let call = Call {
            route,
            method: Method::POST,
            path: format!("/interactions/{id}/{token}/callback"),
            major: id,
        };
        self.json(call, Some(body)).await.map(|_| ())
    }

    /// `POST /channels/{id}/typing`: "typing…" for ten seconds.
    pub async fn typing(&self, channel: &str) -> Result<(), DiscordError> {
        let route = "POST /channels/{channel}/typing";
        snowflake(route, channel)?;
        let call = Call {
            route,
            method: Method::POST,
            path: format!("/channels/{channel}/typing"),
            major: channel,
        };
        self.json(call, None).await.map(|_| ())
    }

    /// The bot's own reaction `emoji` on a message: added (`PUT`) or
    /// removed (`DELETE`).
    pub async fn react(
        &self,
        channel: &str,
        message: &str,
        emoji: &str,
        add: bool,
    ) -> Result<(), DiscordError> {
        let route = if add {
            "PUT /channels/{channel}/messages/{message}/reactions/{emoji}/@me"
        } else {
            "DELETE /channels/{channel}/messages/{message}/reactions/{emoji}/@me"
        };
        snowflake(route, channel)?;
        snowflake(route, message)?;
        let call = Call {
            route,
            method: if add { Method::PUT } else { Method::DELETE },
            path: format!(
                "/channels/{channel}/messages/{message}/reactions/{}/@me",
                encode_segment(emoji)
            ),
            major: channel,
        };
        self.json(call, None).await.map(|_| ())
    }

    /// `POST /channels/{id}/messages` as multipart: `bytes` attached as
    /// `name` (`files[0]`, described in `payload_json`).
    pub async fn upload(
        &self,
        channel: &str,
        name: &str,
        bytes: Bytes,
    ) -> Result<(), DiscordError> {
        let route = "POST /channels/{channel}/messages (file)";
        snowflake(route, channel)?;
        // The name is the artifact's (checked by moat); quotes and line
        // breaks are still kept out of the header.
        let safe: String = name
            .chars()
            .map(|c| {
                if c == '"' || c == '\\' || c.is_control() {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        let payload = json!({
            "allowed_mentions": {"parse": []},
            "attachments": [{"id": 0, "filename": safe}],
            "nonce": rand_u64().to_string(),
            "enforce_nonce": true,
        });
        let boundary = format!("moat-{:016x}", rand_u64());
        let mut body = Vec::with_capacity(bytes.len() + 512);
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"payload_json\"\r\nContent-Type: application/json\r\n\r\n{payload}\r\n")
                .as_bytes(),
        );
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"files[0]\"; filename=\"{safe}\"\r\nContent-Type: application/octet-stream\r\n\r\n")
                .as_bytes(),
        );
        body.extend_from_slice(&bytes);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let call = Call {
            route,
            method: Method::POST,
            path: format!("/channels/{channel}/messages"),
            major: channel,
        };
        let ctype = format!("multipart/form-data; boundary={boundary}");
        self.send(call, &ctype, Bytes::from(body), TIMEOUT * 4)
            .await
            .map(|_| ())
    }
}
