//! A fake Amp service on 127.0.0.1 and a stand-in for Amp's CLI.
//!
//! The fake answers what Amp's CLI (`@ampcode/cli` 0.0.1790142911-g7618fb,
//! run against a logging server on loopback) sends first:
//! `POST /api/internal?getUserInfo` with `Authorization: Bearer <key>` and
//! the body `{"method":"getUserInfo","params":{}}`. It records every
//! request and answers 401 to any credential but the real key. The real CLI
//! goes on to create a thread on Amp's servers (`POST /api/thread-actors`),
//! whose agent loop runs there; that is not faked, so a turn uses the
//! stand-in `amp` below, which makes the same first call with curl and then
//! prints Amp's stream JSON.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The user the fake service says the key belongs to.
pub const FAKE_USER: &str = "fake-user@amp.test";

/// One request the fake saw.
#[derive(Debug, Clone)]
pub struct AmpRequest {
    pub method: String,
    pub path: String,
    /// Every `Authorization` value, in order.
    pub authorization: Vec<String>,
    /// All header lines and the body, as received (for scans).
    pub raw: String,
}

pub struct FakeAmp {
    port: u16,
    seen: Arc<Mutex<Vec<AmpRequest>>>,
}

impl FakeAmp {
    /// Starts the fake; only `Bearer <key>` is accepted.
    pub fn start(key: &str) -> FakeAmp {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let seen: Arc<Mutex<Vec<AmpRequest>>> = Arc::default();
        let (s, key) = (seen.clone(), key.to_string());
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let (s, key) = (s.clone(), key.clone());
                std::thread::spawn(move || serve(c, &s, &key));
            }
        });
        FakeAmp { port, seen }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn requests(&self) -> Vec<AmpRequest> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve(c: std::net::TcpStream, seen: &Mutex<Vec<AmpRequest>>, key: &str) {
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut raw = line.clone();
    let (mut len, mut chunked, mut auth) = (0usize, false, Vec::new());
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        raw.push_str(&h);
        let (k, v) = h.split_once(':').unwrap_or((&h, ""));
        let v = v.trim().to_string();
        match k.trim().to_ascii_lowercase().as_str() {
            "content-length" => len = v.parse().unwrap_or(0),
            "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
            "authorization" => auth.push(v),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).unwrap_or(0);
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            let mut chunk = vec![0; n + 2];
            if r.read_exact(&mut chunk).is_err() || n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        body.resize(len, 0);
        let _ = r.read_exact(&mut body);
    }
    raw.push_str(&String::from_utf8_lossy(&body));
    let ok = auth.len() == 1 && auth[0] == format!("Bearer {key}");
    let (status, answer) = if !ok {
        (
            "401 Unauthorized",
            r#"{"error":"invalid API key"}"#.to_string(),
        )
    } else if path.starts_with("/api/internal?getUserInfo") {
        (
            "200 OK",
            format!(
                r#"{{"ok":true,"result":{{"id":"u-fake","email":"{FAKE_USER}","emailVerified":true,"features":[]}}}}"#
            ),
        )
    } else if path.starts_with("/api/internal?") {
        // The CLI's other start-up calls (loadPlugins, loadSkills): nothing.
        ("200 OK", r#"{"ok":true,"result":{}}"#.to_string())
    } else {
        (
            "404 Not Found",
            r#"{"ok":false,"error":{"code":"not-found"}}"#.to_string(),
        )
    };
    seen.lock().unwrap().push(AmpRequest {
        method,
        path,
        authorization: auth,
        raw,
    });
    let mut c = c;
    let _ = write!(
        c,
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
        answer.len()
    );
}

/// The stand-in for Amp's CLI (`<dir>/bin/amp`): checks it got a settings
/// file, asks Amp's service who it is (the CLI's first call, with the key
/// the sandbox holds) and answers in Amp's stream JSON with what it learnt.
pub const FAKE_AMP: &str = r#"#!/bin/sh
prompt=$(cat)
settings=""
prev=""
for a in "$@"; do
  [ "$prev" = "--settings-file" ] && settings=$a
  prev=$a
done
tools=$(grep -q '"amp.tools.disable"' "$settings" 2>/dev/null && echo tools-limited)
user=$(curl -sS -m 20 -X POST "$AMP_URL/api/internal?getUserInfo" \
  -H "Authorization: Bearer $AMP_API_KEY" -H 'Content-Type: application/json' \
  -d '{"method":"getUserInfo","params":{}}' 2>&1)
email=$(printf '%s' "$user" | sed -n 's/.*"email":"\([^"]*\)".*/\1/p')
[ -n "$email" ] || email="nobody ($(printf '%s' "$user" | tr -d '"\\' | head -c 200))"
text="Amp answers as $email (settings: ${tools:-none}; prompt bytes: ${#prompt})"
printf '{"type":"system","subtype":"init","cwd":"/workspace","session_id":"T-fake","tools":["Bash"],"mcp_servers":[]}\n'
printf '{"type":"assistant","message":{"type":"message","role":"assistant","content":[{"type":"text","text":"%s"}],"stop_reason":"end_turn","usage":{"input_tokens":1,"output_tokens":1}},"parent_tool_use_id":null,"session_id":"T-fake"}\n' "$text"
printf '{"type":"result","subtype":"success","duration_ms":1,"is_error":false,"num_turns":1,"result":"%s","session_id":"T-fake"}\n' "$text"
"#;

/// A CLI directory (`bin/amp` the stand-in) that sandboxes can read.
pub fn fake_amp_dir() -> PathBuf {
    // Named for scripts/clean-test-scratch (the process id last).
    let dir = std::env::temp_dir().join(format!(
        "moat-fakeamp-{}-test-{}",
        crate::clikit::hex(4),
        std::process::id()
    ));
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    for d in [&dir, &dir.join("bin")] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let bin = dir.join("bin").join("amp");
    std::fs::write(&bin, FAKE_AMP).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// A real-looking Amp key, new for each test.
pub fn real_key() -> String {
    format!("sgamp_user_01REAL{}", crate::clikit::hex(16))
}
