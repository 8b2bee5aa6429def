//! moat's chat front-ends: the platform side of the gateway, as a library.
//!
//! Today: Slack ([`slack`]: request signatures, Events API callbacks, the Web
//! API client and Socket Mode) and reply formatting ([`format`]: Markdown to
//! Slack mrkdwn, splitting long replies). This crate owns talking to the chat
//! platform and nothing else: it never decides who may talk (that is
//! `moat-policy`), never stores an event (the gateway's inbox does, and Socket
//! Mode acknowledges only after the gateway says it has), and never puts a
//! token, signing secret or message body into an error or a log line.

#![forbid(unsafe_code)]
// Outside input never reaches an `unwrap`/`expect` (house style); tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod discord;
pub mod format;
pub mod github;
pub mod slack;
pub mod telegram;
pub mod whatsapp;
