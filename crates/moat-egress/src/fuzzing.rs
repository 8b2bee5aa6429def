//! Entry points for the fuzz targets in `fuzz/` (docs/fuzzing.md), compiled
//! only with the `fuzzing` feature. Each one calls the crate's own private
//! parser exactly as the door does; none changes what the door does.
//!
//! Must never: be enabled in a build that serves sandboxes (nothing here is
//! needed there), or hold logic of its own beyond building the state a
//! private parser needs.

use std::sync::{Arc, Mutex};

use crate::llm::stream::{SseMeter, UsageChunkFilter};
use crate::llm::Usage;
use crate::state::NameTable;
use crate::{DoorConfig, MemoryAudit, Resolver, State};

/// The DNS stub's answer to `query` under an allowlist of `allow` entries
/// (each as written in a config's `network.allow`): what the stub would send
/// back, `None` when it would drop the message.
pub fn dns_answer(allow: &[&str], query: &[u8]) -> Option<Vec<u8>> {
    let allow = allow
        .iter()
        .filter_map(|a| moat_policy::network::parse_allow_entry(a).ok())
        .collect();
    let policy = moat_policy::network::NetworkPolicy {
        allow,
        pins: Default::default(),
    };
    let state = State {
        cfg: DoorConfig {
            lease: "fuzz".into(),
            policy: Arc::new(policy),
            resolver: Resolver::Static(Default::default()),
            audit: Arc::new(MemoryAudit::default()),
            llm: None,
            github: None,
            amp: None,
        },
        names: Mutex::new(NameTable::default()),
        llm: None,
        github: None,
        amp: None,
        intercept: None,
    };
    crate::dns::answer(&state, query)
}

/// What the LLM door's meter reads from a server-sent event stream that
/// arrives in `chunks`: the usage and whether the API's last event passed.
pub fn sse_usage<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> (Usage, bool) {
    let mut m = SseMeter::default();
    for c in chunks {
        m.feed(c);
    }
    (m.usage, m.complete)
}

/// What a client gets of a stream arriving in `chunks` when the door took
/// out the usage-only chunk it asked for.
pub fn strip_usage_chunk<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut f = UsageChunkFilter::default();
    let mut out = Vec::new();
    for c in chunks {
        out.extend(f.push(c));
    }
    out.extend(f.finish());
    out
}

/// The ref updates of a push as the GitHub door reads them: `Ok(None)` when
/// more bytes are needed, else (refs, capabilities, bytes taken).
pub type PushCommands = (Vec<String>, Vec<String>, usize);

/// See [`PushCommands`].
pub fn parse_push(buf: &[u8]) -> Result<Option<PushCommands>, String> {
    Ok(crate::github::push::parse_push(buf)?.map(|c| (c.refs, c.caps, c.len)))
}
