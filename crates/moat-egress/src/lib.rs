//! moat-egress: the sandbox's only door to the network.
//!
//! A [`Door`] owns one sandbox's network namespace (loopback only) and the
//! listeners inside it: an HTTP forward proxy with CONNECT tunnels, a DNS stub
//! that never forwards a query, and transparent listeners for clients that
//! ignore proxy variables. Every destination is judged by the policy's
//! allowlist, resolved on the host, checked by the SSRF guard, connected to at
//! exactly the checked address, and recorded in the audit log.
//!
//! Must never: forward a DNS query, connect before a verdict, connect to an
//! address other than the one checked, forward an ambiguous HTTP request, let a
//! tunnel's TLS name differ from its target, or put a body or secret in a record.

// Outside input never reaches an `unwrap`/`expect` (house style); tests may.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod amp;
mod audit;
mod conn;
pub mod dns;
mod door;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod github;
pub mod http;
mod intercept;
pub mod llm;
pub mod netns;
mod state;
pub mod tls;
pub mod upstream;

pub(crate) use audit::now_ms;
pub use audit::{Audit, EgressRecord, JsonlAudit, MemoryAudit};
pub use door::{Door, DNS_PORT, PROXY_PORT, STEP_TIMEOUT};
pub(crate) use state::State;
pub use state::{DoorConfig, Resolver};
