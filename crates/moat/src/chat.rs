//! `moat chat`: a terminal client for the gateway's web chat API. Each line
//! typed is a message in one conversation; the answer streams back as the
//! sandbox produces it. Plain HTTP to a gateway on this machine (or behind a
//! TLS-terminating proxy that forwards to it); a token, if the gateway wants
//! one, comes from an environment variable, never from the command line.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context};

#[derive(clap::Args)]
pub struct ChatArgs {
    /// The gateway's web chat address.
    #[arg(long, default_value = "http://127.0.0.1:8080", value_name = "URL")]
    pub url: String,
    /// Conversation name (letters, digits, - and _); default: a new one.
    #[arg(long, value_name = "NAME")]
    pub conversation: Option<String>,
    /// Environment variable holding the bearer token (for auth = "token").
    #[arg(long, value_name = "VAR")]
    pub token_env: Option<String>,
}

struct Target {
    host: String,
    port: u16,
    token: Option<String>,
}

impl Target {
    fn connect(&self) -> anyhow::Result<TcpStream> {
        let s = TcpStream::connect((self.host.as_str(), self.port))
            .with_context(|| format!("cannot reach the gateway at {}:{}", self.host, self.port))?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }

    fn head(&self, method: &str, path: &str, extra: &str) -> String {
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        format!(
            "{method} {path} HTTP/1.1\r\nHost: {}:{}\r\n{auth}{extra}",
            self.host, self.port
        )
    }
}

fn parse_url(url: &str) -> anyhow::Result<(String, u16)> {
    let Some(rest) = url.strip_prefix("http://") else {
        bail!("--url {url}: write http://HOST[:PORT] (moat chat speaks plain HTTP to a local gateway)");
    };
    let hostport = rest.trim_end_matches('/');
    match hostport.rsplit_once(':') {
        Some((h, p)) => Ok((h.to_string(), p.parse().context("--url: bad port")?)),
        None => Ok((hostport.to_string(), 80)),
    }
}

static ANSWERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Prints the conversation's events until the connection ends.
fn follow(t: &Target, conv: &str) -> anyhow::Result<()> {
    let mut s = t.connect()?;
    let req = t.head(
        "GET",
        &format!("/api/conversations/{conv}/events"),
        "Accept: text/event-stream\r\n\r\n",
    );
    s.write_all(req.as_bytes())?;
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status)?;
    if !status.contains(" 200 ") {
        bail!("the gateway answered {}", status.trim());
    }
    let mut line = String::new();
    let mut in_text = false;
    // A turn's answer is shown once (after a gateway restart the history
    // and a delivery again may both carry it).
    let mut answered = std::collections::HashSet::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let Some(data) = line.trim_end().strip_prefix("data: ") else {
            continue;
        };
        let Ok(ev) = serde_json::from_str::<serde_json::Value>(data) else {
            continue;
        };
        let text = ev["text"].as_str().unwrap_or("");
        let mut out = std::io::stdout().lock();
        match ev["type"].as_str() {
            Some("text") => {
                let _ = write!(out, "{text}");
                in_text = true;
            }
            Some("answer") if ev["turn"].as_i64().is_some_and(|t| !answered.insert(t)) => {}
            Some("answer") => {
                if !in_text {
                    let _ = write!(out, "{text}");
                    if !text.ends_with('\n') {
                        let _ = writeln!(out);
                    }
                }
                if ev["ok"] == false {
                    let _ = writeln!(out, "(failed)");
                }
                in_text = false;
                let _ = write!(out, "> ");
                ANSWERS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            Some("notice") => {
                let _ = writeln!(out, "[moat] {text}");
            }
            _ => {}
        }
        let _ = out.flush();
    }
}

fn post(t: &Target, conv: &str, text: &str) -> anyhow::Result<()> {
    let body = serde_json::json!({ "text": text }).to_string();
    let mut s = t.connect()?;
    let req = t.head(
        "POST",
        &format!("/api/conversations/{conv}/messages"),
        &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    s.write_all(req.as_bytes())?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp.lines().next().unwrap_or("");
    if !(status.contains(" 202 ") || status.contains(" 200 ")) {
        let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").trim();
        bail!("not accepted: {} {body}", status.trim());
    }
    Ok(())
}

pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let (host, port) = parse_url(&args.url)?;
    let token = match &args.token_env {
        Some(var) => Some(
            std::env::var(var)
                .with_context(|| format!("--token-env {var}: the variable is not set"))?,
        ),
        None => None,
    };
    let t = Target { host, port, token };
    let conv = args.conversation.clone().unwrap_or_else(|| {
        let mut b = [0u8; 6];
        let _ = getrandom::getrandom(&mut b);
        format!(
            "cli-{}",
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        )
    });
    if conv.is_empty()
        || conv.len() > 64
        || !conv
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        bail!("--conversation {conv}: use 1-64 letters, digits, - or _");
    }
    eprintln!(
        "moat chat: conversation {conv} at {}; each line is a message, Ctrl-D ends",
        args.url
    );
    let mut following = false;
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    print!("> ");
    let _ = std::io::stdout().flush();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let before = ANSWERS.load(std::sync::atomic::Ordering::SeqCst);
        if let Err(e) = post(&t, &conv, &line) {
            eprintln!("moat chat: {e:#}");
            continue;
        }
        let command = matches!(
            line.trim().to_ascii_lowercase().as_str(),
            "stop" | "abort" | "status"
        );
        if !following {
            following = true;
            let t2 = Target {
                host: t.host.clone(),
                port: t.port,
                token: t.token.clone(),
            };
            let c2 = conv.clone();
            std::thread::spawn(move || {
                if let Err(e) = follow(&t2, &c2) {
                    eprintln!("moat chat: {e:#}");
                }
            });
        }
        // Read from a file or pipe: one message, one answer, in order (typed
        // at a terminal, the next line may be `stop`, so don't wait there).
        if !interactive && !command {
            let deadline = std::time::Instant::now() + Duration::from_secs(600);
            while ANSWERS.load(std::sync::atomic::Ordering::SeqCst) <= before
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    println!();
    Ok(())
}
