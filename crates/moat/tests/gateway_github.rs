//! GitHub from chat, end to end: a web-chat conversation in a channel with
//! `github = { ... }` gets, for each turn, a door that intercepts GitHub with
//! a token minted for exactly the channel's repositories and permissions and
//! revoked when the turn ends. The agent (the shell agent: each message is a
//! shell script) clones, commits, pushes a branch and opens a pull request
//! with real git and curl; the answer says what reached GitHub from the
//! door's own record; a push to a protected branch and a workflow change are
//! refused and the thread is told. The fake GitHub (`netkit/fake_github.py`)
//! on 127.0.0.1 holds the only real tokens, and logs what reached it.
//!
//! Must never: contact a real GitHub, or put the App key or a token
//! anywhere but moat's secrets and the fake.

mod githubkit;
#[path = "../../moat-gateway/tests/gwkit/mod.rs"]
mod gwkit;
mod netkit;

use githubkit::{app_key, FakeGithub, APP_ID, INSTALLATION, OWNER, REPO};
use serde_json::Value;

fn config(fake: &FakeGithub, github: &str) -> String {
    let mut t = gwkit::web_config(
        1,
        "",
        &format!("users = [\"*\"]\ndebounce = \"0ms\"\nagent = \"shell\"\ngithub = {github}"),
    );
    t.push_str(&format!(
        "\n[github]\napi_url = \"{}\"\nweb_url = \"{}\"\nallow_plain_http = true\n",
        fake.api_url(),
        fake.web_url()
    ));
    t
}

fn secrets() -> Vec<(String, String)> {
    vec![
        ("GITHUB_APP_ID".into(), APP_ID.into()),
        (
            "GITHUB_APP_PRIVATE_KEY".into(),
            app_key().private_pem.clone(),
        ),
        ("GITHUB_APP_INSTALLATION_ID".into(), INSTALLATION.into()),
    ]
}

/// Sends `script` to conversation `thread` as its `n`th message and
/// returns the `n`th answer's text (the event stream replays the earlier ones).
fn turn(gw: &gwkit::Gw, thread: &str, script: &str, n: usize) -> String {
    let client = gw.client(None);
    let r = client.post(thread, script);
    assert_eq!(r.status, 202, "{r:?}");
    let mut sse = client.events(thread).expect("events");
    let evs = sse.answers(n);
    let answers = gwkit::answers_of(&evs);
    assert_eq!(answers.len(), n, "{evs:#?}");
    answers[n - 1].0.clone()
}

const WORK: &str = r#"set -u
cd /tmp && rm -rf r && git clone -q https://github.com/@O@/@R@.git r && cd r || exit 1
git checkout -q -b moat/web-change
echo change > CHANGE && git add CHANGE
git -c user.name=agent -c user.email=agent@moat.invalid commit -qm change
git push -q origin HEAD 2>&1; echo "branch-push=$?"
curl -sS -o /tmp/pr.json -w 'pr-status=%{http_code}\n' -X POST \
  -H "Authorization: Bearer $GH_TOKEN" -H 'Content-Type: application/json' \
  -d '{"title":"change","head":"moat/web-change","base":"main"}' \
  https://api.github.com/repos/@O@/@R@/pulls
git push origin HEAD:main 2>&1; echo "main-push=$?"
git push origin HEAD:release/2.0 2>&1; echo "release-push=$?"
"#;

const WORKFLOW: &str = r#"curl -sS -o /dev/null -w 'workflow-status=%{http_code}\n' -X PUT \
  -H "Authorization: Bearer $GH_TOKEN" -H 'Content-Type: application/json' \
  -d '{"message":"ci","content":"b246IHB1c2g=","branch":"moat/web-change"}' \
  https://api.github.com/repos/@O@/@R@/contents/.github/workflows/ci.yml
"#;

fn fill(s: &str) -> String {
    s.replace("@O@", OWNER).replace("@R@", REPO)
}

#[test]
fn attack_g1_a_turn_gets_a_token_of_its_channels_repositories_only_and_is_told_what_reached_github()
{
    let fake = FakeGithub::start();
    let toml = config(
        &fake,
        &format!("{{ repos = [\"{OWNER}/{REPO}\"], protect = [\"main\", \"release/*\"] }}"),
    );
    let gw = gwkit::Gw::start_with("gh-e2e", &toml, secrets());

    let answer = turn(&gw, "t1", &fill(WORK), 1);
    // What the agent's own commands saw.
    assert!(answer.contains("branch-push=0"), "{answer}");
    assert!(answer.contains("pr-status=201"), "{answer}");
    assert!(answer.contains("main-push=1"), "{answer}");
    assert!(
        answer.contains("pushes to the protected branch main are refused"),
        "git shows the door's reason: {answer}"
    );
    assert!(
        answer.contains("release-push=1"),
        "a pattern protects: {answer}"
    );
    // What moat adds, from the door's record.
    assert!(answer.contains("On GitHub (moat's record):"), "{answer}");
    assert!(
        answer.contains(&format!("- pushed moat/web-change to {OWNER}/{REPO}")),
        "{answer}"
    );
    assert!(
        answer.contains(&format!(
            "- opened pull request #1 in {OWNER}/{REPO}: https://github.com/{OWNER}/{REPO}/pull/1"
        )),
        "{answer}"
    );
    assert!(!answer.contains("pushed main"), "{answer}");

    // GitHub: the branch is there, main and release/* are not moved.
    assert!(fake.branch(REPO, "moat/web-change").is_some());
    assert_eq!(
        fake.branch(REPO, "main").as_deref(),
        Some(fake.main0.as_str())
    );
    assert!(fake.branch(REPO, "release/2.0").is_none());
    let pulls = fake.kind("pull");
    assert_eq!(pulls.len(), 1, "{pulls:?}");
    assert_eq!(pulls[0]["head"], "moat/web-change");
    // One token for the turn, with exactly the channel's scope, revoked
    // when the turn ended; every request carried it, never a placeholder.
    let minted = fake.kind("minted");
    assert_eq!(minted.len(), 1, "{minted:?}");
    assert_eq!(minted[0]["repositories"], serde_json::json!([REPO]));
    assert_eq!(
        minted[0]["permissions"],
        serde_json::json!({"contents": "write", "pull_requests": "write"})
    );
    let t1 = minted[0]["token"].as_str().unwrap().to_string();
    fake.wait_for("revoked", |r| r["token"] == t1.as_str());
    fake.assert_swapped(&[]);

    // The next turn gets a token of its own; a workflow change is refused
    // without the grant, and never reaches GitHub.
    let answer = turn(&gw, "t1", &fill(WORKFLOW), 2);
    assert!(answer.contains("workflow-status=403"), "{answer}");
    assert!(
        !fake.records().iter().any(|r| r["path"]
            .as_str()
            .is_some_and(|p| p.contains(".github/workflows"))),
        "a workflow change reached GitHub"
    );

    // No token, JWT or key line in the answers, the audit log or the store.
    let audit = std::fs::read_to_string(gw.audit_path()).unwrap();
    for t in fake.tokens() {
        assert!(!audit.contains(&t), "a token in the audit log");
        assert!(!answer.contains(&t), "a token in an answer");
    }
    assert!(
        !audit.contains(&app_key().line),
        "the App key in the audit log"
    );
    // The activity is audited, from the door.
    let acts: Vec<Value> = gw.audit_kind("github-activity");
    assert_eq!(acts.len(), 2, "{acts:#?}");
    assert_eq!(acts[0]["activity"]["event"], "pushed");
    assert_eq!(acts[1]["activity"]["event"], "pull-request");
    gw.stop();
}

/// GitHub can refuse a ref inside an HTTP 200 (a hook, a rule): the door
/// reads its report-status, so moat's record says refused, not pushed.
#[test]
fn a_ref_github_refuses_in_its_report_is_told_as_refused_not_pushed() {
    let fake = FakeGithub::start();
    // GitHub's side: an update hook that declines one branch (per ref, so
    // the other ref of the same push goes through).
    let hook = fake.bare(REPO).join("hooks/update");
    std::fs::write(
        &hook,
        "#!/bin/sh\ncase \"$1\" in refs/heads/moat/refused) echo 'rule: no' >&2; exit 1;; esac\n",
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let toml = config(&fake, &format!("{{ repos = [\"{OWNER}/{REPO}\"] }}"));
    let gw = gwkit::Gw::start_with("gh-report", &toml, secrets());
    let script = fill(
        r#"cd /tmp && rm -rf r && git clone -q https://github.com/@O@/@R@.git r && cd r || exit 1
echo x > X && git add X && git -c user.name=a -c user.email=a@moat.invalid commit -qm x
git push origin HEAD:refs/heads/moat/ok HEAD:refs/heads/moat/refused 2>&1; echo "push=$?"
"#,
    );
    let answer = turn(&gw, "t-report", &script, 1);
    assert!(answer.contains("push=1"), "git saw the refusal: {answer}");
    assert!(
        answer.contains(&format!("- pushed moat/ok to {OWNER}/{REPO}\n")),
        "{answer}"
    );
    assert!(
        answer.contains(&format!(
            "- GitHub refused the push of moat/refused to {OWNER}/{REPO}: hook declined"
        )),
        "{answer}"
    );
    assert!(!answer.contains("pushed moat/ok, moat/refused"), "{answer}");
    assert!(fake.branch(REPO, "moat/ok").is_some());
    assert!(fake.branch(REPO, "moat/refused").is_none());
    let acts: Vec<Value> = gw.audit_kind("github-activity");
    assert_eq!(acts.len(), 1, "{acts:#?}");
    assert_eq!(acts[0]["activity"]["confirmed"], true, "{acts:#?}");
    assert_eq!(
        acts[0]["activity"]["rejected"][0]["name"], "refs/heads/moat/refused",
        "{acts:#?}"
    );
    gw.stop();
}

#[test]
fn without_the_app_settings_the_gateway_refuses_to_start_naming_the_variable() {
    let fake = FakeGithub::start();
    let toml = config(&fake, &format!("{{ repos = [\"{OWNER}/{REPO}\"] }}"));
    let cfg = moat_policy::gateway::GatewayConfig::from_toml(&toml).unwrap();
    let secret = |_: &str| -> Option<String> { None };
    let err =
        moat_gateway::github_setup::templates(&cfg, &secret, std::path::Path::new("/nonexistent"))
            .unwrap_err();
    assert!(
        err.starts_with("channel[0].github:") && err.contains("GITHUB_APP_ID"),
        "{err}"
    );
}

/// The last line of an answer that starts with `prefix`, without it.
fn after<'a>(answer: &'a str, prefix: &str) -> &'a str {
    answer
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix} line in:\n{answer}"))
}

#[test]
fn a_pooled_turn_starts_with_the_repository_on_a_branch_of_its_own() {
    let fake = FakeGithub::start();
    let toml = config(
        &fake,
        &format!("{{ repos = [\"{OWNER}/{REPO}\"], clone = \"{OWNER}/{REPO}\" }}"),
    );
    let gw = gwkit::Gw::start_with("gh-clone", &toml, secrets());
    let script = format!(
        "echo branch=$(git -C {REPO} branch --show-current); echo head=$(git -C {REPO} rev-parse HEAD); echo depth=$(git -C {REPO} rev-list --count HEAD); ls -a /workspace | tr '\\n' ' ' | sed 's/^/files=/'; echo"
    );
    let answer = turn(&gw, "c1", &script, 1);
    let branch = after(&answer, "branch=");
    assert!(
        branch.starts_with("moat/") && branch.contains("-echo-branch-git-c"),
        "{answer}"
    );
    assert_eq!(after(&answer, "head="), fake.main0, "{answer}");
    assert_eq!(after(&answer, "depth="), "1", "a shallow clone: {answer}");
    assert!(
        !after(&answer, "files=").contains(".moat-clone"),
        "{answer}"
    );
    // Through the door with the turn's token, revoked afterwards.
    fake.assert_swapped(&[]);
    let t = fake.tokens();
    assert_eq!(t.len(), 1);
    fake.wait_for("revoked", |r| r["token"] == t[0].as_str());

    // The next pooled turn starts from the default branch again, on a new
    // branch named after its own message.
    let answer = turn(
        &gw,
        "c1",
        "git -C private-repo branch --show-current | sed 's/^/second=/'",
        2,
    );
    let second = after(&answer, "second=");
    assert!(second.contains("-git-c-private-repo"), "{answer}");
    assert_ne!(second, branch);
    gw.stop();
}

#[test]
fn a_per_thread_conversation_keeps_its_clone_and_branch() {
    let fake = FakeGithub::start();
    let mut toml = config(
        &fake,
        &format!("{{ repos = [\"{OWNER}/{REPO}\"], clone = \"{OWNER}/{REPO}\", depth = 0 }}"),
    );
    toml = toml.replace(
        "agent = \"shell\"",
        "agent = \"shell\"\nsandbox = \"per-thread\"",
    );
    let gw = gwkit::Gw::start_with("gh-clone-kept", &toml, secrets());
    let first = turn(
        &gw,
        "k1",
        &format!("echo mine > {REPO}/MINE; echo b=$(git -C {REPO} branch --show-current)"),
        1,
    );
    let branch = after(&first, "b=").to_string();
    let second = turn(
        &gw,
        "k1",
        &format!("cat {REPO}/MINE; echo b=$(git -C {REPO} branch --show-current)"),
        2,
    );
    assert!(second.contains("mine"), "the clone was kept: {second}");
    assert_eq!(after(&second, "b="), branch, "{second}");
    gw.stop();
}

#[test]
fn a_failed_clone_answers_with_the_reason_and_the_agent_does_not_run() {
    let fake = FakeGithub::start();
    let toml = config(
        &fake,
        &format!("{{ repos = [\"{OWNER}/missing-repo\"], clone = \"{OWNER}/missing-repo\" }}"),
    );
    let gw = gwkit::Gw::start_with("gh-clone-fail", &toml, secrets());
    let client = gw.client(None);
    assert_eq!(client.post("f1", "echo agent-ran").status, 202);
    let mut sse = client.events("f1").expect("events");
    let evs = sse.answers(1);
    let answers = gwkit::answers_of(&evs);
    let (text, ok) = &answers[0];
    assert!(!ok, "{text}");
    assert!(
        text.contains("could not clone moat-test-org/missing-repo")
            && text.contains("the agent did not run"),
        "{text}"
    );
    assert!(!text.contains("agent-ran"), "{text}");
    gw.stop();
}

const HOOK_SECRET: &str = "made-up-webhook-secret-for-the-test";

/// Posts one webhook delivery; `sig`: the signature header to send, if any.
fn deliver(gw: &gwkit::Gw, event: &str, id: &str, body: &str, sig: Option<String>) -> u16 {
    let mut h: Vec<(&str, &str)> = vec![
        ("Content-Type", "application/json"),
        ("X-GitHub-Event", event),
        ("X-GitHub-Delivery", id),
    ];
    let sig = sig.unwrap_or_default();
    if !sig.is_empty() {
        h.push(("X-Hub-Signature-256", sig.as_str()));
    }
    gwkit::request(gw.web, "POST", "/github/webhook", &h, Some(body)).status
}

fn signed(body: &str) -> Option<String> {
    Some(moat_chat::github::sign(HOOK_SECRET, body.as_bytes()))
}

fn pr_event(repo: &str, number: u64, action: &str, merged: bool) -> String {
    serde_json::json!({
        "action": action,
        "repository": {"full_name": repo},
        "pull_request": {"number": number, "title": "change", "merged": merged,
                          "head": {"ref": "moat/web-change"}},
    })
    .to_string()
}

/// The notices conversation `thread` got so far (its event stream replays them).
fn notices(gw: &gwkit::Gw, thread: &str) -> Vec<String> {
    let mut sse = gw.client(None).events(thread).expect("events");
    sse.during(std::time::Duration::from_millis(300))
        .iter()
        .filter(|v| gwkit::kind(v) == "notice")
        .filter_map(|v| v["text"].as_str().map(String::from))
        .collect()
}

#[test]
fn attack_g3_forged_replayed_foreign_and_unknown_webhooks_reach_no_thread() {
    let fake = FakeGithub::start();
    let toml = config(&fake, &format!("{{ repos = [\"{OWNER}/{REPO}\"] }}")).replace(
        "allow_plain_http = true\n",
        "allow_plain_http = true\nwebhook = true\n",
    );
    let mut s = secrets();
    s.push(("GITHUB_WEBHOOK_SECRET".into(), HOOK_SECRET.into()));
    let gw = gwkit::Gw::start_with("gh-hooks", &toml, s);
    // A turn pushes a branch and opens pull request #1: the door's record
    // links both to this conversation.
    let answer = turn(&gw, "w1", &fill(WORK), 1);
    assert!(answer.contains("opened pull request #1"), "{answer}");
    let repo = format!("{OWNER}/{REPO}");

    // Signed and new: told once in the thread that opened it.
    let merged = pr_event(&repo, 1, "closed", true);
    assert_eq!(
        deliver(&gw, "pull_request", "d-1", &merged, signed(&merged)),
        200
    );
    // The same delivery again (a replay, or GitHub's redelivery): once.
    assert_eq!(
        deliver(&gw, "pull_request", "d-1", &merged, signed(&merged)),
        200
    );
    // The same signed body under a new delivery id (the id is not signed).
    assert_eq!(
        deliver(&gw, "pull_request", "d-1-again", &merged, signed(&merged)),
        200
    );
    // A check suite names only the branch.
    let checks = serde_json::json!({"action": "completed", "repository": {"full_name": repo},
        "check_suite": {"conclusion": "success", "head_branch": "moat/web-change", "pull_requests": []}})
    .to_string();
    assert_eq!(
        deliver(&gw, "check_suite", "d-2", &checks, signed(&checks)),
        200
    );

    // Forged: a wrong secret, a body changed after signing, no signature.
    let reopened = pr_event(&repo, 1, "reopened", false);
    let forged = Some(moat_chat::github::sign(
        "not-the-secret",
        reopened.as_bytes(),
    ));
    assert_eq!(deliver(&gw, "pull_request", "d-3", &reopened, forged), 401);
    assert_eq!(
        deliver(&gw, "pull_request", "d-4", &reopened, signed(&merged)),
        401
    );
    assert_eq!(deliver(&gw, "pull_request", "d-5", &reopened, None), 401);
    // A pull request no conversation opened, a repository no channel has.
    let unknown = pr_event(&repo, 99, "opened", false);
    assert_eq!(
        deliver(&gw, "pull_request", "d-6", &unknown, signed(&unknown)),
        200
    );
    let foreign = pr_event("someone/else", 1, "reopened", false);
    assert_eq!(
        deliver(&gw, "pull_request", "d-7", &foreign, signed(&foreign)),
        200
    );
    // Over GitHub's 25 MB: refused before anything is read.
    let huge = "x".repeat(25 * 1024 * 1024 + 1);
    assert_eq!(
        deliver(&gw, "pull_request", "d-8", &huge, signed("{}")),
        413
    );

    let told = notices(&gw, "w1");
    assert_eq!(
        told,
        vec![
            "GitHub: pull request #1 (change) was merged".to_string(),
            "GitHub: checks on moat/web-change finished: success".to_string(),
        ],
        "exactly the two genuine events, once each"
    );
    let verdicts: Vec<String> = gw
        .audit_kind("github-webhook")
        .iter()
        .map(|r| r["verdict"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        verdicts,
        [
            "delivered",
            "duplicate",
            "duplicate",
            "delivered",
            // Forged deliveries are audited at most once every 10 seconds.
            "forged",
            "ignored",
            "ignored",
        ],
        "{:#?}",
        gw.audit_kind("github-webhook")
    );
    let audit = std::fs::read_to_string(gw.audit_path()).unwrap();
    assert!(
        !audit.contains(HOOK_SECRET),
        "the webhook secret in the audit log"
    );
    gw.stop();
}

#[test]
fn a_pull_request_comment_mentioning_the_bot_runs_a_turn_as_the_mapped_user() {
    let fake = FakeGithub::start();
    let toml = config(
        &fake,
        &format!("{{ repos = [\"{OWNER}/{REPO}\"], users = {{ octocat = \"alice\" }} }}"),
    )
    .replace(
        "allow_plain_http = true\n",
        "allow_plain_http = true\nwebhook = true\nbot = \"moat-bot\"\n",
    );
    let mut s = secrets();
    s.push(("GITHUB_WEBHOOK_SECRET".into(), HOOK_SECRET.into()));
    let gw = gwkit::Gw::start_with("gh-comment", &toml, s);
    let answer = turn(&gw, "r1", &fill(WORK), 1);
    assert!(answer.contains("opened pull request #1"), "{answer}");
    let comment = |login: &str, body: &str| {
        serde_json::json!({"action": "created", "repository": {"full_name": format!("{OWNER}/{REPO}")},
            "issue": {"number": 1, "pull_request": {}},
            "comment": {"user": {"login": login}, "body": body}})
        .to_string()
    };
    // An unmapped login: told as a line, no turn.
    let c = comment("mallory", "echo from-mallory-$((6*7)) # @moat-bot");
    assert_eq!(deliver(&gw, "issue_comment", "c-1", &c, signed(&c)), 200);
    // A comment without the mention: told, no turn.
    let c = comment("octocat", "echo not-for-the-bot-$((6*7))");
    assert_eq!(deliver(&gw, "issue_comment", "c-2", &c, signed(&c)), 200);
    // The mapped login mentioning the bot: a turn, as the mapped user.
    let c = comment("octocat", "echo from-review-$((6*7)) # @moat-bot");
    assert_eq!(deliver(&gw, "issue_comment", "c-3", &c, signed(&c)), 200);
    let mut sse = gw.client(None).events("r1").expect("events");
    let evs = sse.answers(2);
    let answers = gwkit::answers_of(&evs);
    assert!(answers[1].0.contains("from-review-42"), "{answers:?}");
    let all: String = answers.iter().map(|a| a.0.clone()).collect();
    assert!(
        !all.contains("from-mallory-42") && !all.contains("not-for-the-bot-42"),
        "{all}"
    );
    let msgs: Vec<Value> = gw
        .audit_kind("message")
        .into_iter()
        .filter(|r| r["verdict"] == "accepted")
        .collect();
    assert_eq!(msgs.len(), 2, "{msgs:#?}");
    assert_eq!(msgs[1]["user"], "alice");
    assert!(gw
        .audit_kind("github-webhook")
        .iter()
        .any(|r| r["login"] == "mallory" && r["verdict"] == "ignored"));
    gw.stop();
}

/// Waits in `sse` for the next approval request; its (url, detail).
fn next_approval(sse: &mut gwkit::Sse) -> (String, String) {
    let ev = sse
        .until(gwkit::WAIT, |v| v["type"] == "approval")
        .pop()
        .unwrap();
    (
        ev["url"].as_str().unwrap().to_string(),
        ev["detail"].as_str().unwrap_or("").to_string(),
    )
}

fn decide(gw: &gwkit::Gw, url: &str, approve: bool) -> u16 {
    gwkit::request(
        gw.web,
        "POST",
        url,
        &[("Content-Type", "application/json")],
        Some(&serde_json::json!({ "approve": approve }).to_string()),
    )
    .status
}

// I6 for pushes: a channel with approve = ["github_push"] holds every push
// in the door until its admin decides. The denied push never reaches
// GitHub (git is told why); the approved one does, after the click.
#[test]
fn attack_i6_a_push_waits_for_an_admin_and_a_denied_one_never_reaches_github() {
    let fake = FakeGithub::start();
    let toml = config(&fake, &format!("{{ repos = [\"{OWNER}/{REPO}\"] }}")).replacen(
        "users = [\"*\"]",
        "users = [\"*\"]\nadmins = [\"local\"]\napprove = [\"github_push\"]\napprove_timeout = \"60s\"",
        1,
    );
    let gw = gwkit::Gw::start_with("gh-approve", &toml, secrets());
    let script = fill(
        r#"cd /tmp && rm -rf r && git clone -q https://github.com/@O@/@R@.git r && cd r || exit 1
echo x > X && git add X && git -c user.name=a -c user.email=a@moat.invalid commit -qm x
git push origin HEAD:refs/heads/moat/denied 2>&1; echo "push1=$?"
git push origin HEAD:refs/heads/moat/approved 2>&1; echo "push2=$?"
"#,
    );
    let client = gw.client(None);
    assert_eq!(client.post("t-approve", &script).status, 202);
    let mut sse = client.events("t-approve").expect("events");
    let (url, detail) = next_approval(&mut sse);
    assert!(detail.contains("moat/denied"), "{detail}");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        fake.branch(REPO, "moat/denied").is_none(),
        "pushed before a decision"
    );
    assert_eq!(decide(&gw, &url, false), 200);
    let (url, detail) = next_approval(&mut sse);
    assert!(detail.contains("moat/approved"), "{detail}");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        fake.branch(REPO, "moat/approved").is_none(),
        "pushed before a decision"
    );
    assert_eq!(decide(&gw, &url, true), 200);
    let answer = gwkit::answers_of(&sse.answers(1)).remove(0).0;
    assert!(answer.contains("push1=1"), "git saw the refusal: {answer}");
    assert!(answer.contains("not approved by an admin"), "{answer}");
    assert!(answer.contains("push2=0"), "{answer}");
    assert!(fake.branch(REPO, "moat/denied").is_none());
    assert!(fake.branch(REPO, "moat/approved").is_some());
    let a = gw.audit_kind("approval");
    assert!(a
        .iter()
        .any(|r| r["verdict"] == "denied" && r["action"] == "github_push" && r["by"] == "local"));
    assert!(a
        .iter()
        .any(|r| r["verdict"] == "approved" && r["action"] == "github_push"));
    gw.stop();
}
