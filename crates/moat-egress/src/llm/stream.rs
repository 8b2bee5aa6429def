//! A streamed (SSE) LLM response on its way to the sandbox: each frame passes
//! on as it arrives, its usage is read as it passes, the real keys are
//! redacted from it, and the usage-only chunk the door asked for is taken out.
//! A client that hangs up does not end the count: the door keeps reading the
//! upstream (bounded in time and bytes) for the usage, and charges the
//! request's own output limit when the usage never comes (docs/threat-model.md C5).
//!
//! Must never: buffer a stream whole, hold back bytes that cannot be part of
//! a key or of the chunk being removed, or leave a call uncounted.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::Value;

use super::redact::Redactor;
use super::{Call, Pending, Usage};

/// Longest SSE line the usage meter looks at (longer lines pass unread).
const MAX_SSE_LINE: usize = 1024 * 1024;
/// How long the door keeps reading a stream its client left, for the usage.
pub const DRAIN_TIME: Duration = Duration::from_secs(60);
/// How much of such a stream it reads at most.
pub const DRAIN_BYTES: usize = 16 * 1024 * 1024;
/// Output tokens charged for a call whose usage never came and whose request
/// set no limit (`max_tokens`, `max_completion_tokens`, `max_output_tokens`).
pub const FALLBACK_OUTPUT_TOKENS: u64 = 32_768;

/// Reads `data:` lines of a server-sent event stream as they pass.
#[derive(Default)]
pub(crate) struct SseMeter {
    line: Vec<u8>,
    overlong: bool,
    pub(crate) usage: Usage,
    /// The API's last event passed (`message_stop`, `response.completed`,
    /// `[DONE]`, ...): a client that goes away now has the whole answer.
    pub(crate) complete: bool,
}

impl SseMeter {
    pub(crate) fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            match chunk.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    self.push(&chunk[..i]);
                    self.end_line();
                    chunk = &chunk[i + 1..];
                }
                None => {
                    self.push(chunk);
                    chunk = &[];
                }
            }
        }
    }
    fn push(&mut self, b: &[u8]) {
        if self.line.len() + b.len() > MAX_SSE_LINE {
            self.overlong = true;
            self.line.clear();
        } else if !self.overlong {
            self.line.extend_from_slice(b);
        }
    }
    fn end_line(&mut self) {
        let line = std::mem::take(&mut self.line);
        let overlong = std::mem::replace(&mut self.overlong, false);
        if overlong {
            return;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(&line);
        if let Some(data) = line.strip_prefix(b"data:") {
            if data.trim_ascii() == b"[DONE]" {
                self.complete = true;
            } else if let Ok(v) = serde_json::from_slice::<Value>(data) {
                self.usage.absorb(&v);
                let last = matches!(
                    v.get("type").and_then(Value::as_str),
                    Some(
                        "message_stop"
                            | "response.completed"
                            | "response.failed"
                            | "response.incomplete"
                    )
                );
                self.complete |= last;
            }
        }
    }
}

/// Takes the usage-only chunk of a Chat Completions stream (`"choices":[]`
/// with a `usage`) out of what the client sees, when the door asked for it.
#[derive(Default)]
pub(crate) struct UsageChunkFilter {
    line: Vec<u8>,
}

impl UsageChunkFilter {
    fn usage_only(line: &[u8]) -> bool {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return false;
        };
        serde_json::from_slice::<Value>(data).is_ok_and(|v| {
            v.get("choices")
                .and_then(Value::as_array)
                .is_some_and(|c| c.is_empty())
                && v.get("usage").is_some_and(Value::is_object)
        })
    }

    /// Whole lines pass (all but the usage chunk's); a line waits for its end.
    pub(crate) fn push(&mut self, mut chunk: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(chunk.len());
        while let Some(i) = chunk.iter().position(|b| *b == b'\n') {
            self.line.extend_from_slice(&chunk[..=i]);
            chunk = &chunk[i + 1..];
            let line = std::mem::take(&mut self.line);
            if !Self::usage_only(&line) {
                out.extend_from_slice(&line);
            }
        }
        self.line.extend_from_slice(chunk);
        if self.line.len() > MAX_SSE_LINE {
            out.append(&mut self.line);
        }
        out
    }

    pub(crate) fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.line)
    }
}

/// What a call is charged when its usage did not come whole.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Estimate {
    /// Input tokens, when the upstream never said: request bytes / 4.
    pub input: u64,
    /// Output tokens: the request's limit, or [`FALLBACK_OUTPUT_TOKENS`].
    pub output: u64,
    /// The endpoint generates output: a success without usage still cost.
    pub generates: bool,
}

impl Estimate {
    /// `generates`: the endpoint produces output tokens (not a model list
    /// or a token count).
    pub(crate) fn new(body_len: usize, max_output: Option<u64>, generates: bool) -> Estimate {
        Estimate {
            input: (body_len as u64).div_ceil(4),
            output: if generates {
                max_output.unwrap_or(FALLBACK_OUTPUT_TOKENS)
            } else {
                0
            },
            generates,
        }
    }

    /// What the budget holds for the call while it runs.
    pub(crate) fn tokens(&self) -> u64 {
        self.input.saturating_add(self.output)
    }

    /// `usage` as read, or raised to the estimate when it is not whole.
    pub(crate) fn charge(&self, mut usage: Usage, whole: bool) -> (Usage, bool) {
        if whole {
            return (usage, false);
        }
        if usage.input_tokens == 0
            && usage.cache_creation_input_tokens == 0
            && usage.cache_read_input_tokens == 0
        {
            usage.input_tokens = self.input;
        }
        usage.output_tokens = usage.output_tokens.max(self.output);
        (usage, true)
    }
}

/// Counts and audits a call once.
pub(crate) struct Settle {
    pub st: Arc<crate::State>,
    pub call: Call,
    pub status: u16,
    pub est: Estimate,
    /// Released once the call is counted.
    pub pending: Pending,
}

impl Settle {
    /// `early`: why the stream ended before the client had it all.
    fn finish(self, meter: &mut SseMeter, early: Option<&str>) {
        let usage = std::mem::take(&mut meter.usage);
        let ok = (200..300).contains(&self.status);
        let whole = meter.complete && !(ok && usage.total() == 0);
        let (usage, estimated) = self.est.charge(usage, whole);
        let reason = match (early, estimated) {
            (None, false) => None,
            (Some(e), false) => Some(format!("{e}; its usage was read from the upstream")),
            (e, true) => Some(format!(
                "{}the stream's usage did not come whole; charged {} tokens (output at the request's limit)",
                e.map(|e| format!("{e}; ")).unwrap_or_default(),
                usage.total()
            )),
        };
        if let Some(llm) = self.st.llm.as_ref() {
            llm.count(&self.st.cfg.lease, usage.total());
        }
        self.st.audit_llm(
            self.call
                .record("allowed", reason, None, self.status, usage),
        );
        self.pending.release();
    }
}

/// A streamed response body (see the module).
pub(crate) struct Metered {
    pub inner: Option<Incoming>,
    pub meter: SseMeter,
    pub strip: Option<UsageChunkFilter>,
    pub redact: Redactor,
    pub done: Option<Settle>,
    pub ended: bool,
}

impl Metered {
    fn finish(&mut self, early: Option<&str>) {
        if let Some(s) = self.done.take() {
            s.finish(&mut self.meter, early);
        }
    }

    /// The bytes the client gets of `data`.
    fn pass(&mut self, data: &[u8]) -> Vec<u8> {
        match self.strip.as_mut() {
            Some(f) => {
                let kept = f.push(data);
                self.redact.push(&kept)
            }
            None => self.redact.push(data),
        }
    }

    fn tail(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(f) = self.strip.as_mut() {
            let rest = f.finish();
            out = self.redact.push(&rest);
        }
        out.extend(self.redact.finish());
        out
    }
}

impl Body for Metered {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(None);
            };
            match Pin::new(&mut *inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => {
                    // Trailers are the upstream's own words: not forwarded.
                    let Ok(d) = f.into_data() else { continue };
                    // A stream with a Content-Length ends with its last frame:
                    // hyper stops polling then, so the record is written here.
                    let end = inner.is_end_stream();
                    this.meter.feed(&d);
                    let mut out = this.pass(&d);
                    if end {
                        out.extend(this.tail());
                        this.ended = true;
                        this.finish(None);
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                    }
                }
                Poll::Ready(None) => {
                    let out = this.tail();
                    this.ended = true;
                    this.finish(None);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.ended = true;
                    this.finish(Some(&format!("the upstream stream failed: {e}")));
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        let Some(settle) = self.done.take() else {
            return;
        };
        // A client may hang up once it has the API's last event, before the
        // body's own end arrives: that stream was whole.
        if self.meter.complete {
            return settle.finish(&mut self.meter, None);
        }
        let early = "the client closed the stream early";
        let (Some(inner), Ok(rt)) = (self.inner.take(), tokio::runtime::Handle::try_current())
        else {
            return settle.finish(&mut self.meter, Some(early));
        };
        let meter = std::mem::take(&mut self.meter);
        rt.spawn(drain(
            inner,
            Draining {
                meter,
                settle: Some(settle),
            },
        ));
    }
}

/// A stream being read after its client left; if the door stops first, the
/// call is still charged (at the estimate) as it is dropped.
struct Draining {
    meter: SseMeter,
    settle: Option<Settle>,
}

impl Drop for Draining {
    fn drop(&mut self) {
        if let Some(s) = self.settle.take() {
            s.finish(
                &mut self.meter,
                Some(
                    "the client closed the stream early and the door stopped before its usage came",
                ),
            );
        }
    }
}

/// Reads what is left of a stream whose client left, for its usage.
async fn drain(mut inner: Incoming, mut d: Draining) {
    let deadline = tokio::time::Instant::now() + DRAIN_TIME;
    let mut read = 0usize;
    while !d.meter.complete && read < DRAIN_BYTES {
        match tokio::time::timeout_at(deadline, inner.frame()).await {
            Ok(Some(Ok(f))) => {
                if let Some(data) = f.data_ref() {
                    read += data.len();
                    d.meter.feed(data);
                }
            }
            _ => break,
        }
    }
    drop(inner);
    if let Some(s) = d.settle.take() {
        s.finish(&mut d.meter, Some("the client closed the stream early"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn usage_comes_from_each_apis_own_fields() {
        let mut m = SseMeter::default();
        m.feed(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":3,\"cache_read_input_tokens\":7,\"output_tokens\":1}}}\n\n");
        m.feed(b"event: message_delta\r\ndata: {\"type\":\"message_delta\",\"usa");
        m.feed(b"ge\":{\"output_tokens\":15}}\r\n\r\n");
        assert_eq!(
            m.usage,
            Usage {
                input_tokens: 25,
                output_tokens: 15,
                cache_creation_input_tokens: 3,
                cache_read_input_tokens: 7
            }
        );
        let mut u = Usage::default();
        u.absorb(&json!({"object":"chat.completion","usage":{"prompt_tokens":9,"completion_tokens":12,"prompt_tokens_details":{"cached_tokens":4}}}));
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.cache_read_input_tokens),
            (9, 12, 4)
        );
        let mut u = Usage::default();
        u.absorb(&json!({"type":"response.completed","response":{"usage":{"input_tokens":5,"output_tokens":6}}}));
        assert_eq!(u.total(), 11);
        let mut u = Usage::default();
        u.absorb(&json!({"choices":[],"usage":null}));
        assert_eq!(u.total(), 0);
    }

    #[test]
    fn the_last_event_of_each_api_completes_a_stream() {
        for last in [
            "data: {\"type\":\"message_stop\"}\n\n",
            "data: {\"type\":\"response.completed\",\"response\":{}}\n\n",
            "data: [DONE]\n\n",
        ] {
            let mut m = SseMeter::default();
            m.feed(b"data: {\"type\":\"message_start\",\"message\":{}}\n\n");
            assert!(!m.complete);
            m.feed(last.as_bytes());
            assert!(m.complete, "{last}");
        }
    }

    #[test]
    fn the_usage_chunk_the_door_asked_for_is_taken_out() {
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
                      data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9}}\n\n\
                      data: [DONE]\n\n";
        for cut in 0..stream.len() {
            let mut f = UsageChunkFilter::default();
            let mut out = f.push(&stream.as_bytes()[..cut]);
            out.extend(f.push(&stream.as_bytes()[cut..]));
            out.extend(f.finish());
            assert_eq!(
                String::from_utf8(out).unwrap(),
                "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\ndata: [DONE]\n\n",
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_call_without_whole_usage_is_charged_its_limit() {
        let est = Estimate::new(400, Some(64), true);
        let seen = Usage {
            input_tokens: 35,
            output_tokens: 1,
            ..Usage::default()
        };
        let (u, estimated) = est.charge(seen.clone(), false);
        assert!(estimated);
        assert_eq!((u.input_tokens, u.output_tokens), (35, 64));
        let (u, _) = est.charge(Usage::default(), false);
        assert_eq!((u.input_tokens, u.output_tokens), (100, 64));
        let (u, _) = Estimate::new(8, None, true).charge(Usage::default(), false);
        assert_eq!(u.output_tokens, FALLBACK_OUTPUT_TOKENS);
        assert_eq!(
            Estimate::new(0, None, false).tokens(),
            0,
            "a GET holds nothing"
        );
        assert_eq!(est.charge(seen.clone(), true), (seen, false));
    }
}
