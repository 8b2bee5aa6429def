//! moat-gateway: the pipeline from a chat message to the answer: the durable
//! inbox, authorization, rate limits, debounce, conversations, the runner
//! pool, the agent run in the conversation's sandbox, and the reply.
//!
//! Must never: run a message before it is stored, run two requests in one
//! lease at once, let one conversation see another's files, or drop a stored
//! message without an answer or a failure report.

// Outside input never reaches an `unwrap`/`expect` (house style); tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod agent;
pub mod agents_setup;
pub mod approvals;
pub mod artifacts;
pub mod github_clone;
pub mod github_hooks;
pub mod github_setup;
pub mod groups;
pub mod history;
pub mod hub;
pub mod incident;
pub mod ipc;
pub mod metrics;
pub mod pipeline;
pub mod platform;
pub mod pool;
pub mod retention;
pub mod runner;
pub mod server;
pub mod slack;
pub mod slack_approvals;
pub mod slack_setup;
mod store_setup;
pub mod tasks;
pub mod telegram;
pub mod web;
pub mod whatsapp;
