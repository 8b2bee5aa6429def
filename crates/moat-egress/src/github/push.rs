//! The git side of the door's push protection: the ref updates at the start
//! of a `git-receive-pack` request (git's smart HTTP pkt-lines), and the
//! answer to a refused push in git's own protocol.
//!
//! Owns: finding every ref a push updates before any byte of it goes
//! upstream, and the refusal every git version prints as its own: HTTP 200
//! with a report-status (`unpack ok`, then `ng <ref> <reason>` per ref) and,
//! when the client asked for a side band, moat's reason as a `remote:` line.
//! Must never: forward a push whose commands it could not read, or answer a
//! refused push with something a git client could take for success.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::protect::{protected_branch, refusal_text};
use super::proxy::{full, GhBody};
use crate::STEP_TIMEOUT;

/// Largest ref-update section of a push (the pack after it is streamed).
const MAX_PUSH_COMMANDS: usize = 1024 * 1024;
/// Most of a refused push's pack read (and dropped) so that its client gets
/// to the answer: GitHub's own limit for one push.
const MAX_DRAINED: usize = 2 << 30;

/// The ref updates at the start of a receive-pack request body.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct PushCommands {
    pub(crate) refs: Vec<String>,
    /// The capabilities the client asked for (on its first command).
    pub(crate) caps: Vec<String>,
    /// Bytes of the body the commands took (through the flush packet).
    pub(crate) len: usize,
}

/// Parses the command list of a push (pkt-lines up to the first flush).
/// `Ok(None)`: more bytes are needed. Errors refuse the push.
pub(crate) fn parse_push(buf: &[u8]) -> Result<Option<PushCommands>, String> {
    let mut out = PushCommands::default();
    let mut i = 0;
    let mut first_command = true;
    loop {
        let Some(len_hex) = buf.get(i..i + 4) else {
            return Ok(None);
        };
        // Four hex digits, as git reads them (`from_str_radix` alone would
        // also take a sign: `+0b2`, which git refuses).
        let len = std::str::from_utf8(len_hex)
            .ok()
            .filter(|s| s.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|s| usize::from_str_radix(s, 16).ok())
            .ok_or("moat: the push does not start with git's packet lines")?;
        if len == 0 {
            out.len = i + 4;
            return Ok(Some(out));
        }
        if len < 4 {
            return Err("moat: unexpected special packet in the push's commands".into());
        }
        let Some(line) = buf.get(i + 4..i + len) else {
            return Ok(None);
        };
        i += len;
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let (cmd, caps) = match line.iter().position(|b| *b == 0) {
            Some(z) => (&line[..z], Some(&line[z + 1..])),
            None => (line, None),
        };
        let cmd = std::str::from_utf8(cmd).map_err(|_| "moat: a pushed ref name is not UTF-8")?;
        // A push from a shallow clone starts with `shallow <oid>` lines; the
        // capabilities come with the first command after them.
        if cmd.starts_with("shallow ") {
            continue;
        }
        if first_command {
            if let Some(c) = caps {
                out.caps = String::from_utf8_lossy(c)
                    .split(' ')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
            }
            first_command = false;
        }
        if cmd.starts_with("push-cert") {
            return Err(
                "moat: signed pushes cannot be checked for protected branches and are refused"
                    .into(),
            );
        }
        let mut parts = cmd.splitn(3, ' ');
        let (Some(old), Some(new), Some(refname)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err("moat: a push command is not `old new ref`".into());
        };
        let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(old) || !hex(new) {
            return Err("moat: a push command is not `old new ref`".into());
        }
        out.refs.push(refname.to_string());
    }
}

pub(super) fn pkt(payload: &[u8]) -> Vec<u8> {
    let mut v = format!("{:04x}", payload.len() + 4).into_bytes();
    v.extend_from_slice(payload);
    v
}

/// The answer git shows for a refused push: each ref rejected with the
/// reason, and a `remote:` line saying why. A client that asked for no
/// report-status (no git does) gets a 403 with the reason, never a 200.
pub(super) fn push_refusal(cmds: &PushCommands, branch: &str) -> Response<GhBody> {
    refusal_with(cmds, &refusal_text(branch), |r| {
        match protected_branch(&[branch.to_string()], r) {
            Some(_) => format!("protected branch {branch} (moat)"),
            None => format!("push also updates the protected branch {branch} (moat)"),
        }
    })
}

/// The answer to a push refused as a whole for `text` (one line, moat's
/// words): every ref rejected with `(moat)`.
pub(super) fn push_held_refusal(cmds: &PushCommands, text: &str) -> Response<GhBody> {
    let line: String = text.chars().filter(|c| !c.is_control()).take(300).collect();
    refusal_with(cmds, &format!("moat: {line}"), |_| {
        "not approved by an admin (moat)".to_string()
    })
}

fn refusal_with(
    cmds: &PushCommands,
    text: &str,
    why_of: impl Fn(&str) -> String,
) -> Response<GhBody> {
    if !cmds.caps.iter().any(|c| c.starts_with("report-status")) {
        let mut r = Response::new(full(format!("{text}\n")));
        *r.status_mut() = StatusCode::FORBIDDEN;
        return r;
    }
    let mut report = pkt(b"unpack ok\n");
    for r in &cmds.refs {
        let why = why_of(r);
        report.extend(pkt(format!("ng {r} {why}\n").as_bytes()));
    }
    report.extend_from_slice(b"0000");
    let mut body = Vec::new();
    if cmds
        .caps
        .iter()
        .any(|c| c == "side-band-64k" || c == "side-band")
    {
        body.extend(pkt(format!("\x02{text}\n").as_bytes()));
        for chunk in report.chunks(900) {
            let mut p = vec![1u8];
            p.extend_from_slice(chunk);
            body.extend(pkt(&p));
        }
        body.extend_from_slice(b"0000");
    } else {
        body = report;
    }
    let mut r = Response::new(full(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-git-receive-pack-result"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// A request body: bytes already read, then the rest as it comes.
pub(super) struct Prefixed {
    pub(super) first: Option<Bytes>,
    pub(super) rest: Option<Incoming>,
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(b) = self.first.take() {
            if !b.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
        }
        match self.rest.as_mut() {
            Some(r) => Pin::new(r).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        !matches!(&self.first, Some(b) if !b.is_empty())
            && !matches!(&self.rest, Some(r) if !r.is_end_stream())
    }
}

/// Reads the start of a push until its commands are complete.
pub(super) async fn read_push_commands(
    body: &mut Incoming,
) -> Result<(PushCommands, BytesMut, bool), String> {
    let mut buf = BytesMut::new();
    loop {
        if let Some(c) = parse_push(&buf)? {
            return Ok((c, buf, false));
        }
        if buf.len() > MAX_PUSH_COMMANDS {
            return Err("moat: the push's ref updates are too long to check".into());
        }
        match tokio::time::timeout(STEP_TIMEOUT, body.frame()).await {
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    buf.extend_from_slice(&d);
                }
            }
            Ok(Some(Err(e))) => return Err(format!("moat: the push could not be read: {e}")),
            Ok(None) => {
                return match parse_push(&buf)? {
                    Some(c) => Ok((c, buf, true)),
                    None => Err("moat: the push ended before its ref updates did".into()),
                }
            }
            Err(_) => return Err("moat: timed out reading the push".into()),
        }
    }
}

/// Reads and drops the rest of a refused push's body (its pack): git reads
/// the answer only once it has sent everything, so answering earlier makes
/// it fail with a broken pipe instead of printing the reason. `false` when
/// the body was cut short (over [`MAX_DRAINED`], an error or a stall).
pub(super) async fn drain(body: &mut Incoming) -> bool {
    let mut read = 0usize;
    loop {
        match tokio::time::timeout(STEP_TIMEOUT, body.frame()).await {
            Ok(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    read = read.saturating_add(d.len());
                    if read > MAX_DRAINED {
                        return false;
                    }
                }
            }
            Ok(None) => return true,
            Ok(Some(Err(_))) | Err(_) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push_body(cmds: &[(&str, &str)], caps: &str) -> Vec<u8> {
        let mut b = Vec::new();
        for (i, (new, r)) in cmds.iter().enumerate() {
            let line = if i == 0 {
                format!("{} {new} {r}\0{caps}\n", "0".repeat(40))
            } else {
                format!("{} {new} {r}\n", "0".repeat(40))
            };
            b.extend(pkt(line.as_bytes()));
        }
        b.extend_from_slice(b"0000PACK....");
        b
    }

    #[test]
    fn push_commands_are_read_up_to_the_flush() {
        let new = "a".repeat(40);
        let body = push_body(
            &[(&new, "refs/heads/feature"), (&new, "refs/heads/main")],
            "report-status side-band-64k agent=git/2",
        );
        let c = parse_push(&body).unwrap().unwrap();
        assert_eq!(c.refs, vec!["refs/heads/feature", "refs/heads/main"]);
        assert!(c.caps.contains(&"report-status".to_string()));
        assert_eq!(&body[c.len..], b"PACK....");
        // Every shorter prefix asks for more bytes, never decides.
        for n in 0..c.len {
            assert_eq!(parse_push(&body[..n]).unwrap(), None, "prefix {n}");
        }
        assert!(parse_push(b"zzzz").is_err());
        assert!(parse_push(b"0002").is_err());
        assert!(parse_push(&pkt(b"push-cert\0caps\n")).is_err());
        assert!(parse_push(&pkt(b"nothex xx refs/heads/a\n")).is_err());
    }

    /// Found by the git_push fuzz target: a length written `+0b2` was read
    /// as 0x0b2 while git refuses the line, so the door and git read
    /// different commands from the same bytes.
    #[test]
    fn a_packet_length_is_four_hex_digits_as_git_reads_it() {
        let new = "a".repeat(40);
        let good = push_body(&[(&new, "refs/heads/main")], "report-status");
        assert!(parse_push(&good).unwrap().is_some());
        for sign in [b'+', b'-', b' '] {
            let mut bad = good.clone();
            bad[0] = sign;
            assert!(parse_push(&bad).is_err(), "{:?}", &bad[..4]);
        }
    }

    #[test]
    fn refused_pushes_report_each_ref() {
        let new = "b".repeat(40);
        let body = push_body(&[(&new, "refs/heads/main")], "report-status side-band-64k");
        let c = parse_push(&body).unwrap().unwrap();
        let r = push_refusal(&c, "main");
        assert_eq!(r.status(), StatusCode::OK);
        let c2 = PushCommands {
            refs: vec!["refs/heads/main".into()],
            caps: vec![],
            len: 0,
        };
        assert_eq!(push_refusal(&c2, "main").status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn after_shallow_lines_the_capabilities_of_the_first_command_count() {
        let new = "c".repeat(40);
        let mut body = pkt(format!("shallow {}\n", "d".repeat(40)).as_bytes());
        body.extend(push_body(
            &[(&new, "refs/heads/main")],
            "report-status-v2 side-band-64k",
        ));
        let c = parse_push(&body).unwrap().unwrap();
        assert_eq!(c.refs, vec!["refs/heads/main"]);
        assert_eq!(c.caps, vec!["report-status-v2", "side-band-64k"]);
        assert_eq!(push_refusal(&c, "main").status(), StatusCode::OK);
    }
}
