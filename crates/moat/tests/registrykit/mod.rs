//! A fake npm registry for `moat agents install` tests: plain HTTP on
//! 127.0.0.1, serving packuments and tarballs of packages the test made with
//! `npm pack`, and recording every request it received. Written from npm's
//! registry API documentation (package metadata documents with
//! `versions.<v>.dist.{tarball,integrity,shasum}`, tarballs at the URL the
//! document names; a missing package is a 404).
//!
//! It never contacts anything: tarball URLs name the registry's own host,
//! which the tests pin to 127.0.0.1 with `--resolve`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

/// One published version: its manifest (package.json plus `dist`) and tarball.
struct Published {
    manifest: Value,
    tarball_path: String,
    tarball: Vec<u8>,
}

#[derive(Default)]
struct State {
    /// name -> version -> published
    packages: BTreeMap<String, BTreeMap<String, Published>>,
    /// `METHOD path` of every request, in order.
    requests: Vec<String>,
}

pub struct FakeRegistry {
    pub port: u16,
    /// The host name in tarball URLs (pinned to 127.0.0.1 by the tests).
    pub host: String,
    state: Arc<Mutex<State>>,
}

impl FakeRegistry {
    /// Listens on 127.0.0.1 (a random port); tarball URLs use `host`.
    pub fn start(host: &str) -> FakeRegistry {
        let l = TcpListener::bind("127.0.0.1:0").expect("binding the fake registry");
        let port = l.local_addr().unwrap().port();
        let state: Arc<Mutex<State>> = Arc::default();
        let st = state.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let st = st.clone();
                std::thread::spawn(move || serve(s, &st));
            }
        });
        FakeRegistry {
            port,
            host: host.to_string(),
            state,
        }
    }

    /// The URL to pass as `--registry`.
    pub fn url(&self) -> String {
        format!("http://{}:{}/", self.host, self.port)
    }

    /// `--resolve` for the registry's host.
    pub fn pin(&self) -> String {
        format!("{}=127.0.0.1", self.host)
    }

    /// Packs the package in `dir` (with the host's `npm pack`, which runs no
    /// install script and contacts nothing) and publishes it.
    pub fn publish(&self, dir: &Path) {
        let pkg: Value =
            serde_json::from_slice(&std::fs::read(dir.join("package.json")).unwrap()).unwrap();
        let name = pkg["name"].as_str().unwrap().to_string();
        let version = pkg["version"].as_str().unwrap().to_string();
        let dest = dir.join(".pack");
        std::fs::create_dir_all(&dest).unwrap();
        let out = Command::new("npm")
            .args(["pack", "--json", "--pack-destination"])
            .arg(&dest)
            .current_dir(dir)
            .env("npm_config_cache", dir.join(".npm-cache"))
            .env("npm_config_registry", "http://127.0.0.1:9/")
            .env("npm_config_update_notifier", "false")
            .output()
            .expect("running npm pack (npm must be installed)");
        assert!(
            out.status.success(),
            "npm pack failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let info: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "npm pack --json: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        let info = &info[0];
        let file = info["filename"].as_str().unwrap().to_string();
        let tarball = std::fs::read(dest.join(&file)).unwrap();
        let base = name.rsplit('/').next().unwrap();
        let tarball_path = format!("/{name}/-/{base}-{version}.tgz");
        let mut manifest = pkg.clone();
        manifest["_id"] = json!(format!("{name}@{version}"));
        manifest["dist"] = json!({
            "tarball": format!("http://{}:{}{tarball_path}", self.host, self.port),
            "integrity": info["integrity"],
            "shasum": info["shasum"],
        });
        if pkg["scripts"]["postinstall"].is_string() || pkg["scripts"]["install"].is_string() {
            manifest["hasInstallScript"] = json!(true);
        }
        self.state
            .lock()
            .unwrap()
            .packages
            .entry(name)
            .or_default()
            .insert(
                version,
                Published {
                    manifest,
                    tarball_path,
                    tarball,
                },
            );
    }

    /// `METHOD path` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

/// Writes a package directory: `package.json` with a `bin` command `command`
/// that prints `<name> <version>` for `--version` (and `hello from ...`
/// otherwise), plus `extra` files and package.json `scripts`.
pub fn make_package(
    parent: &Path,
    name: &str,
    version: &str,
    command: &str,
    scripts: Value,
    extra: &[(&str, &str)],
) -> PathBuf {
    let dir = parent.join(format!("pkg-{}-{version}", name.replace(['@', '/'], "_")));
    std::fs::create_dir_all(&dir).unwrap();
    let pkg = json!({
        "name": name,
        "version": version,
        "description": "a test package for moat agents install",
        "license": "MIT",
        "bin": { command: "cli.js" },
        "scripts": scripts,
    });
    std::fs::write(dir.join("package.json"), format!("{pkg:#}\n")).unwrap();
    std::fs::write(
        dir.join("cli.js"),
        format!(
            "#!/usr/bin/env node\nif (process.argv.includes('--version')) {{ console.log('{name} {version}'); }} else {{ console.log('hello from {name} {version}'); }}\n"
        ),
    )
    .unwrap();
    for (f, text) in extra {
        std::fs::write(dir.join(f), text).unwrap();
    }
    dir
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(s: &mut TcpStream, status: &str, ctype: &str, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
    let _ = s.flush();
}

fn serve(mut s: TcpStream, state: &Mutex<State>) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    while !data.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
        if data.len() > 64 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&data).into_owned();
    let line = head.lines().next().unwrap_or("").to_string();
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    // A proxy may forward the absolute form; keep the path.
    let path = match target.strip_prefix("http://") {
        Some(rest) => rest
            .find('/')
            .map(|i| rest[i..].to_string())
            .unwrap_or("/".into()),
        None => target.clone(),
    };
    let path = path.split('?').next().unwrap_or("").to_string();
    let mut st = state.lock().unwrap();
    st.requests.push(format!("{method} {path}"));
    if method != "GET" {
        drop(st);
        return respond(
            &mut s,
            "405 Method Not Allowed",
            "application/json",
            b"{\"error\":\"method not allowed\"}",
        );
    }
    // A tarball?
    for versions in st.packages.values() {
        for p in versions.values() {
            if p.tarball_path == path {
                let body = p.tarball.clone();
                drop(st);
                return respond(&mut s, "200 OK", "application/octet-stream", &body);
            }
        }
    }
    // A packument: /name or /@scope%2fname (or /@scope/name).
    let name = percent_decode(path.trim_start_matches('/'));
    if let Some(versions) = st.packages.get(&name) {
        let latest = versions.keys().last().cloned().unwrap_or_default();
        let doc = json!({
            "_id": name,
            "name": name,
            "dist-tags": { "latest": latest },
            "versions": versions.iter().map(|(v, p)| (v.clone(), p.manifest.clone())).collect::<serde_json::Map<_, _>>(),
        });
        drop(st);
        return respond(
            &mut s,
            "200 OK",
            "application/json",
            doc.to_string().as_bytes(),
        );
    }
    drop(st);
    respond(
        &mut s,
        "404 Not Found",
        "application/json",
        b"{\"error\":\"Not found\"}",
    )
}
