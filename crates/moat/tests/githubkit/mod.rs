//! The fake GitHub of moat's GitHub tests (`netkit/fake_github.py`, see
//! tests/github.rs) and the throwaway App key it checks JWTs with, shared by
//! the CLI tests and the gateway's end-to-end GitHub tests.
//!
//! Must never: contact a real GitHub or write a key anywhere but the test's
//! scratch directory.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::netkit::{fresh_dir, WAIT};

pub const FAKE_GITHUB_PY: &str = include_str!("../netkit/fake_github.py");
pub const APP_ID: &str = "424242";
pub const INSTALLATION: &str = "777";
pub const OWNER: &str = "moat-test-org";
pub const REPO: &str = "private-repo";
pub const REPO2: &str = "second-repo";
/// Tags in the fake's repositories: enough that git's upload-pack requests
/// exceed 1 KiB and are sent gzip-encoded.
pub const TAGS: usize = 40;

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

pub fn base64(data: &[u8], url: bool) -> String {
    let alpha: &[u8] = if url {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(alpha[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else if !url {
                out.push('=');
            }
        }
    }
    out
}

/// The `Authorization` value git sends for an installation token.
pub fn basic(token: &str) -> String {
    format!(
        "Basic {}",
        base64(format!("x-access-token:{token}").as_bytes(), false)
    )
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Runs git on the host (for setting up and inspecting the fake's repositories).
pub fn git(dir: &Path, args: &[&str]) -> String {
    let o = Command::new("git")
        .args([
            "-c",
            "user.name=moat test",
            "-c",
            "user.email=test@moat.invalid",
            "-c",
            "init.defaultBranch=main",
            "-c",
            "safe.directory=*",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git");
    assert!(
        o.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Fills `@O@`, `@R@` and `@R2@` in a script.
pub fn fill(script: &str) -> String {
    script
        .replace("@O@", OWNER)
        .replace("@R2@", REPO2)
        .replace("@R@", REPO)
}

/// The value after `PREFIX` on the first line starting with it.
pub fn line(text: &str, prefix: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix} line in:\n{text}"))
        .to_string()
}

// ---------------------------------------------------------------------------
// The App's key pair
// ---------------------------------------------------------------------------

pub struct AppKey {
    pub private_pem: String,
    pub public_path: PathBuf,
    /// A line from the middle of the private key's PEM body: what a scan for
    /// the key looks for.
    pub line: String,
}

/// One RSA key pair per test binary, made with the openssl CLI (never
/// committed). The private key file is deleted once read.
pub fn app_key() -> &'static AppKey {
    static KEY: OnceLock<AppKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let (dir, _) = fresh_dir("app-key");
        let private = dir.join("app.pem");
        let public_path = dir.join("app.pub.pem");
        let ok = Command::new("openssl")
            .args(["genrsa", "-traditional", "-out"])
            .arg(&private)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .expect("openssl CLI")
            .success();
        assert!(ok, "openssl genrsa failed");
        let ok = Command::new("openssl")
            .args(["rsa", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public_path)
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok, "openssl rsa -pubout failed");
        let private_pem = std::fs::read_to_string(&private).unwrap();
        std::fs::remove_file(&private).unwrap();
        let body: Vec<&str> = private_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let line = body[body.len() / 2].to_string();
        assert_eq!(line.len(), 64, "unexpected PEM layout");
        AppKey {
            private_pem,
            public_path,
            line,
        }
    })
}

/// An App JWT signed with the openssl CLI (for the fake's own self-test).
pub fn sign_jwt(claims: &Value) -> String {
    let (dir, _) = fresh_dir("jwt");
    let key = dir.join("k.pem");
    std::fs::write(&key, &app_key().private_pem).unwrap();
    let input = format!(
        "{}.{}",
        base64(br#"{"alg":"RS256","typ":"JWT"}"#, true),
        base64(claims.to_string().as_bytes(), true)
    );
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-binary", "-sign"])
        .arg(&key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "openssl dgst -sign failed");
    format!("{input}.{}", base64(&out.stdout, true))
}

// ---------------------------------------------------------------------------
// The fake GitHub
// ---------------------------------------------------------------------------

/// `fake_github.py` on 127.0.0.1, serving the bare repositories
/// `root/OWNER/{REPO,REPO2}.git` (a README on main and `TAGS` tags each), on
/// two ports: `web` stands for github.com, `api` for api.github.com (and the
/// App's token endpoints), so the log tells which upstream a request used.
pub struct FakeGithub {
    pub web_port: u16,
    pub api_port: u16,
    pub child: Child,
    pub root: PathBuf,
    pub log: PathBuf,
    /// main's commit when the fake started.
    pub main0: String,
}

impl FakeGithub {
    pub fn start() -> FakeGithub {
        let (dir, _) = fresh_dir("fake-github");
        let root = dir.join("root");
        let mut main0 = String::new();
        for name in [REPO, REPO2] {
            let work = dir.join(format!("work-{name}"));
            std::fs::create_dir_all(&work).unwrap();
            git(&work, &["init", "-q"]);
            std::fs::write(work.join("README"), format!("# {name}\n")).unwrap();
            git(&work, &["add", "README"]);
            git(&work, &["commit", "-q", "-m", "first"]);
            let head = git(&work, &["rev-parse", "HEAD"]);
            let mut tags = String::new();
            for i in 1..=TAGS {
                tags.push_str(&format!("create refs/tags/v{i} {head}\n"));
            }
            let mut c = Command::new("git")
                .args(["update-ref", "--stdin"])
                .current_dir(&work)
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            c.stdin.take().unwrap().write_all(tags.as_bytes()).unwrap();
            assert!(c.wait().unwrap().success());
            let bare = root.join(OWNER).join(format!("{name}.git"));
            std::fs::create_dir_all(bare.parent().unwrap()).unwrap();
            git(
                &dir,
                &[
                    "clone",
                    "-q",
                    "--bare",
                    work.to_str().unwrap(),
                    bare.to_str().unwrap(),
                ],
            );
            if name == REPO {
                main0 = head;
            }
        }
        let script = dir.join("fake_github.py");
        std::fs::write(&script, FAKE_GITHUB_PY).unwrap();
        let log = dir.join("github.jsonl");
        let mut child = Command::new("python3")
            .arg("-u")
            .arg(&script)
            .args([APP_ID, INSTALLATION])
            .arg(&app_key().public_path)
            .arg(OWNER)
            .arg(format!("{REPO},{REPO2}"))
            .arg(&root)
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 for the fake GitHub");
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let ready: Value = serde_json::from_str(&first)
            .unwrap_or_else(|e| panic!("the fake GitHub did not start ({e}): {first:?}"));
        FakeGithub {
            web_port: ready["web"].as_u64().unwrap() as u16,
            api_port: ready["api"].as_u64().unwrap() as u16,
            child,
            root,
            log,
            main0,
        }
    }

    /// The upstream for github.com (`MOAT_GITHUB_URL`).
    pub fn web_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.web_port)
    }

    /// The upstream for api.github.com and the broker (`MOAT_GITHUB_API_URL`).
    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    pub fn bare(&self, repo: &str) -> PathBuf {
        self.root.join(OWNER).join(format!("{repo}.git"))
    }

    /// A branch's commit in the fake's repository, if the branch exists.
    pub fn branch(&self, repo: &str, name: &str) -> Option<String> {
        let o = Command::new("git")
            .args(["-c", "safe.directory=*", "--git-dir"])
            .arg(self.bare(repo))
            .args(["rev-parse", "--verify", "-q"])
            .arg(format!("refs/heads/{name}"))
            .output()
            .unwrap();
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
    }

    /// Creates `branch` in the fake's repository: a commit adding `file` on
    /// top of main. Returns its id.
    pub fn host_branch(&self, repo: &str, branch: &str, file: &str) -> String {
        let bare = self.bare(repo);
        let (work, _) = fresh_dir("host-commit");
        git(&work, &["clone", "-q", bare.to_str().unwrap(), "w"]);
        let w = work.join("w");
        std::fs::write(w.join(file), format!("{file}\n")).unwrap();
        git(&w, &["add", file]);
        git(&w, &["commit", "-q", "-m", file]);
        git(
            &w,
            &["push", "-q", "origin", &format!("HEAD:refs/heads/{branch}")],
        );
        git(&w, &["rev-parse", "HEAD"])
    }

    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn records(&self) -> Vec<Value> {
        self.text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    pub fn kind(&self, kind: &str) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|r| r["kind"] == kind)
            .collect()
    }

    /// Requests the sandbox's door sent (minting and revoking left out).
    pub fn sandbox_requests(&self) -> Vec<Value> {
        self.kind("request")
            .into_iter()
            .filter(|r| {
                let p = r["path"].as_str().unwrap_or("");
                !p.starts_with("/app/") && p != "/installation/token"
            })
            .collect()
    }

    /// The tokens the fake minted, in order.
    pub fn tokens(&self) -> Vec<String> {
        self.kind("minted")
            .iter()
            .map(|r| r["token"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn jwts(&self) -> Vec<String> {
        self.kind("minted")
            .iter()
            .map(|r| r["jwt"].as_str().unwrap().to_string())
            .collect()
    }

    /// Waits until a record of `kind` satisfies `pred` (records written by
    /// the door's last calls may trail moat's exit by a moment).
    pub fn wait_for(&self, kind: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let t0 = Instant::now();
        loop {
            if let Some(r) = self.kind(kind).into_iter().find(&pred) {
                return r;
            }
            assert!(
                t0.elapsed() < WAIT,
                "no {kind} record as expected in the fake's log:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `(old, new, ref)` of every ref update that reached receive-pack.
    pub fn pushed_refs(&self) -> Vec<String> {
        self.kind("request")
            .iter()
            .filter(|r| {
                r["method"] == "POST"
                    && r["path"]
                        .as_str()
                        .is_some_and(|p| p.ends_with("/git-receive-pack"))
            })
            .flat_map(|r| r["commands"].as_array().cloned().unwrap_or_default())
            .map(|c| c["ref"].as_str().unwrap_or("").to_string())
            .collect()
    }

    /// Asserts that everything the sandbox sent reached the fake with the
    /// real token (Bearer for the API, Basic for github.com) and never a
    /// placeholder.
    pub fn assert_swapped(&self, placeholders: &[&str]) {
        // (The door mints on first use: a run whose requests were all refused
        // mints nothing, and then no request may have reached the fake.)
        let tokens = self.tokens();
        let text = self.text();
        for ph in placeholders {
            assert!(
                !text.contains(ph),
                "a placeholder reached the fake GitHub:\n{text}"
            );
        }
        for r in self.sandbox_requests() {
            let auth = r["headers"]["authorization"].as_str().unwrap_or("");
            let web = r["server"] == "web";
            let ok = tokens.iter().any(|t| {
                if web {
                    auth == basic(t)
                } else {
                    auth == format!("Bearer {t}")
                }
            });
            assert!(ok, "request without the real token in the door's form: {r}");
        }
    }
}

impl Drop for FakeGithub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
