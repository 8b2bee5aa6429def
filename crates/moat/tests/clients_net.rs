//! Real clients inside sandboxes, through the egress door, against servers the
//! test runs on this machine: curl and wget (proxy variables, HTTP and HTTPS
//! through CONNECT), git clone over HTTPS (smart HTTP served by
//! `git http-backend`), Python's urllib (proxy variables) and Node's fetch
//! (which ignores proxy variables: the DNS stub and the transparent listeners).
//! Each also shows that a name off the list fails for that client.

mod netkit;

use std::path::Path;
use std::process::Command;

use netkit::*;

fn git(dir: &Path, args: &[&str]) {
    let o = Command::new("git")
        .args([
            "-c",
            "user.name=moat test",
            "-c",
            "user.email=test@moat.invalid",
            "-c",
            "init.defaultBranch=main",
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
}

fn curl_and_wget(b: Backend) {
    let up = Upstream::loopback();
    let pki = Pki::new(&["web.test", "front.test"]);
    let tls = TlsServer::start(&pki, None);
    let (p, t) = (up.port, tls.port);
    let mut sb = Sandbox::new(b, "curl");
    sb.allow(&format!("web.test:{p}"))
        .allow(&format!("front.test:{t}"))
        .pin("web.test", "127.0.0.1")
        .pin("front.test", "127.0.0.1")
        .pin("other.test", "127.0.0.1")
        .trust(&pki);
    let pr = sb
        .sh(&format!(
            "t curl_http curl -sS -m 10 -f http://web.test:{p}/curl\n\
             t curl_https curl -sS -m 10 -f https://front.test:{t}/curl\n\
             t curl_https_head curl -sS -m 10 -f -I https://front.test:{t}/curl-head\n\
             t curl_other curl -sS -m 10 -f http://other.test:{p}/curl\n\
             t curl_other_https curl -sS -m 10 -f https://other.test:{t}/curl\n\
             t wget_http wget -q -T 10 -t 1 -O - http://web.test:{p}/wget\n\
             t wget_https wget -q -T 10 -t 1 --ca-certificate=/workspace/ca.pem -O - https://front.test:{t}/wget\n\
             t wget_other wget -q -T 10 -t 1 -O - http://other.test:{p}/wget\n"
        ))
        .probes();
    pr.succeeded("curl_http", "upstream-ok GET /curl HTTP/1.1");
    pr.succeeded("curl_https", "tls-hello /curl");
    pr.succeeded("curl_https_head", "200");
    pr.failed(
        "curl_other",
        Some(22),
        "The requested URL returned error: 403",
    );
    pr.failed("curl_other_https", Some(22), "returned error: 403");
    pr.succeeded("wget_http", "upstream-ok GET /wget HTTP/1.1");
    pr.succeeded("wget_https", "tls-hello /wget");
    pr.failed("wget_other", Some(8), "");
    let mut lines = up.request_lines();
    lines.sort();
    assert_eq!(lines, ["GET /curl HTTP/1.1", "GET /wget HTTP/1.1"]);
    let mut paths: Vec<String> = tls.requests().into_iter().map(|r| r.1).collect();
    paths.sort();
    assert_eq!(paths, ["/curl", "/curl-head", "/wget"]);
    let audit = sb.audit();
    audit.assert_denied("http", "other.test", "not on the allowlist");
    audit.assert_denied("connect", "other.test", "not on the allowlist");
}

fn git_clone(b: Backend) {
    // A real repository with two commits, served read-only by git http-backend.
    let (root, _) = fresh_dir("git-root");
    let work = root.join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q"]);
    std::fs::write(work.join("README"), "cloned through the moat door\n").unwrap();
    git(&work, &["add", "README"]);
    git(&work, &["commit", "-q", "-m", "first"]);
    std::fs::create_dir_all(work.join("src")).unwrap();
    std::fs::write(work.join("src/lib.txt"), "x".repeat(100_000)).unwrap();
    git(&work, &["add", "src"]);
    git(&work, &["commit", "-q", "-m", "second"]);
    git(&root, &["clone", "-q", "--bare", "work", "repo.git"]);
    let pki = Pki::new(&["git.test", "evil.test"]);
    let tls = TlsServer::start(&pki, Some(&root));
    let t = tls.port;
    let mut sb = Sandbox::new(b, "git");
    sb.allow(&format!("git.test:{t}"))
        .pin("git.test", "127.0.0.1")
        .pin("evil.test", "127.0.0.1")
        .trust(&pki);
    let pr = sb
        .sh(&format!(
            "t clone git clone -q https://git.test:{t}/git/repo.git /tmp/clone\n\
             t readme cat /tmp/clone/README\n\
             t log git -C /tmp/clone log --format=%s\n\
             t size sh -c 'wc -c < /tmp/clone/src/lib.txt'\n\
             t fsck git -C /tmp/clone fsck --no-progress\n\
             t lsremote git ls-remote https://git.test:{t}/git/repo.git\n\
             t clone_other git clone -q https://evil.test:{t}/git/repo.git /tmp/other\n\
             t clone_noproxy env -u HTTPS_PROXY -u https_proxy git clone -q https://git.test:{t}/git/repo.git /tmp/noproxy\n"
        ))
        .probes();
    pr.succeeded("clone", "");
    pr.succeeded("readme", "cloned through the moat door");
    pr.succeeded("log", "second first");
    pr.succeeded("size", "100000");
    pr.succeeded("fsck", "");
    pr.succeeded("lsremote", "refs/heads/main");
    pr.failed("clone_other", Some(128), "403");
    // Without the proxy variables git resolves through the stub and reaches
    // the door's transparent listener: allowed, and judged by SNI.
    pr.succeeded("clone_noproxy", "");
    let reqs = tls.requests();
    assert!(
        reqs.iter()
            .any(|r| r.1 == "/git/repo.git/info/refs?service=git-upload-pack"),
        "{reqs:?}"
    );
    assert!(
        reqs.iter()
            .any(|r| r.0 == "POST" && r.1 == "/git/repo.git/git-upload-pack"),
        "{reqs:?}"
    );
    assert!(reqs.iter().all(|r| r.2.starts_with("git.test")), "{reqs:?}");
    let audit = sb.audit();
    audit.assert_allowed("connect", "git.test");
    audit.assert_allowed("transparent-tls", "git.test");
    audit.assert_denied("connect", "evil.test", "not on the allowlist");
}

fn python_urllib(b: Backend) {
    let up = Upstream::loopback();
    let pki = Pki::new(&["front.test", "other.test"]);
    let tls = TlsServer::start(&pki, None);
    let (p, t) = (up.port, tls.port);
    let marker = format!("py-{}", random_hex(8));
    let mut sb = Sandbox::new(b, "urllib");
    sb.allow(&format!("web.test:{p}"))
        .allow(&format!("front.test:{t}"))
        .pin("web.test", "127.0.0.1")
        .pin("front.test", "127.0.0.1")
        .pin("other.test", "127.0.0.1")
        .trust(&pki);
    let r = sb.python(
        &(format!(
            "P = {p}\nT = {t}\nM = {}\n",
            serde_json::to_string(&marker).unwrap()
        ) + r#"
import urllib.request, urllib.error
def get(url, data=None):
    req = urllib.request.Request(url, data=data, headers={"X-Marker": M})
    with urllib.request.urlopen(req, timeout=15) as resp:
        return {"status": resp.status, "body": resp.read().decode()}
def proxies():
    return urllib.request.getproxies()
attempt("proxies", proxies)
attempt("http", get, "http://web.test:%d/urllib" % P)
attempt("post", get, "http://web.test:%d/urllib-post" % P, M.encode() * 1000)
attempt("https", get, "https://front.test:%d/urllib" % T)
attempt("other", get, "http://other.test:%d/urllib" % P)
attempt("other https", get, "https://other.test:%d/urllib" % T)
"#),
    );
    let proxies = py_ok(&r, "proxies");
    assert_eq!(proxies["http"], "http://127.0.0.1:3128", "{proxies}");
    assert_eq!(proxies["https"], "http://127.0.0.1:3128", "{proxies}");
    let v = py_ok(&r, "http");
    assert_eq!(v["status"], 200);
    assert_eq!(v["body"], "upstream-ok GET /urllib HTTP/1.1\n");
    assert_eq!(py_ok(&r, "post")["status"], 200);
    assert_eq!(py_ok(&r, "https")["body"], "tls-hello /urllib\n");
    let other = &r["other"];
    assert_eq!(other["error"], "HTTPError", "{other}");
    assert!(other["text"].as_str().unwrap().contains("403"), "{other}");
    let other = &r["other https"];
    assert_eq!(other["error"], "URLError", "{other}");
    assert!(
        other["text"]
            .as_str()
            .unwrap()
            .contains("Tunnel connection failed: 403"),
        "{other}"
    );
    let hits = up.hits();
    assert_eq!(hits.len(), 2);
    let post = hits
        .iter()
        .find(|h| h.request_line() == "POST /urllib-post HTTP/1.1")
        .expect("the POST");
    assert!(post.text().ends_with(&marker.repeat(1000)));
    assert_eq!(tls.requests().len(), 1);
    let audit = sb.audit();
    audit.assert_absent(&marker);
    audit.assert_denied("http", "other.test", "not on the allowlist");
    audit.assert_denied("connect", "other.test", "not on the allowlist");
}

fn node_fetch(b: Backend) {
    let up = Upstream::loopback();
    let pki = Pki::new(&["front.test"]);
    let tls = TlsServer::start(&pki, None);
    let (p, t) = (up.port, tls.port);
    let mut sb = Sandbox::new(b, "node");
    sb.allow(&format!("web.test:{p}"))
        .allow(&format!("front.test:{t}"))
        .pin("web.test", "127.0.0.1")
        .pin("front.test", "127.0.0.1")
        .pin("other.test", "127.0.0.1")
        .trust(&pki);
    sb.file(
        "fetch.js",
        format!(
            r#"
const results = {{}};
async function attempt(label, url) {{
  try {{
    const r = await fetch(url, {{ signal: AbortSignal.timeout(15000) }});
    results[label] = {{ ok: true, status: r.status, body: await r.text() }};
  }} catch (e) {{
    results[label] = {{ ok: false, error: String(e), cause: String(e.cause && (e.cause.code || e.cause)) }};
  }}
}}
(async () => {{
  await attempt("http", "http://web.test:{p}/node");
  await attempt("https", "https://front.test:{t}/node");
  await attempt("other", "http://other.test:{p}/node");
  await attempt("ip", "http://127.0.0.1:{p}/node");
  await attempt("ip6", "http://[::1]:{p}/node");
  console.log(JSON.stringify(results));
}})();
"#
        )
        .as_bytes(),
    );
    let out = sb.run_argv(&["node", "/workspace/fetch.js"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let r = out.json();
    assert_eq!(r["http"]["ok"], true, "{r}");
    assert_eq!(r["http"]["body"], "upstream-ok GET /node HTTP/1.1\n");
    assert_eq!(r["https"]["ok"], true, "{r}");
    assert_eq!(r["https"]["body"], "tls-hello /node\n");
    assert_eq!(r["other"]["ok"], false, "{r}");
    assert!(
        ["EAI_AGAIN", "ENOTFOUND"].contains(&r["other"]["cause"].as_str().unwrap()),
        "{r}"
    );
    // An IP literal is not a name the stub handed out: the door's listener on
    // that port takes the connection and closes it, or nothing listens.
    assert_eq!(r["ip"]["ok"], false, "{r}");
    assert_eq!(r["ip6"]["ok"], false, "{r}");
    assert_eq!(up.request_lines(), ["GET /node HTTP/1.1"]);
    assert_eq!(tls.requests().len(), 1);
    let audit = sb.audit();
    audit.assert_allowed("transparent-http", "web.test");
    audit.assert_allowed("transparent-tls", "front.test");
    audit.assert_denied("dns", "other.test", "never forwards");
    audit.assert_denied(
        "transparent-tls",
        "127.0.0.1",
        "not an address the DNS stub",
    );
    assert!(
        audit.find("connect", "web.test", "allowed").is_empty()
            && audit.find("http", "web.test", "allowed").is_empty(),
        "node's fetch used the proxy: {}",
        audit.text
    );
}

net_tests! {
    client_curl_and_wget_through_the_proxy => curl_and_wget;
    client_git_clone_over_https => git_clone;
    client_python_urllib_uses_the_proxy_variables => python_urllib;
    client_node_fetch_uses_the_dns_stub_and_transparent_listeners => node_fetch;
}
