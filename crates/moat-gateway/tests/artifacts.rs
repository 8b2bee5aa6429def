//! Artifacts (issue 6, item 5; docs/threat-model.md F3): what an agent leaves in
//! `~/artifacts` is read on the host without following any link out of the
//! lease, and sent to the chat.
//!
//! The `collect` tests run real leases on both backends (bwrap and gVisor): a
//! shell command inside the sandbox prepares `~/artifacts`, then the host
//! collects it. The `attack_f3_*` tests plant links to `/etc/shadow`, to a
//! host file and to another lease's file, and a `~/artifacts` that is itself
//! a link; each asserts the attack failed (refused, nothing of the target in
//! what would be sent) and the host is unchanged (contents, mode, mtime, and
//! an access time set in the past that any read would have moved).
//! End to end: the shell agent's file reaches a fake Slack's thread with the
//! right bytes and a left symlink is told in the threaded answer; the web
//! chat shows an artifact event and serves the file to its owner only.
//!
//! Run as root: `cargo test -p moat-gateway --test artifacts -- --test-threads=2`.

mod gwkit;
mod slack_kit;

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use moat_gateway::artifacts::{collect, ArtifactLimits, Collected, Refusal};
use moat_policy::{BackendKind, SandboxPolicy};
use moat_sandbox::{Engine, EngineConfig, Lease, LeaseOptions, RunSpec, Stream};
use serde_json::Value;

// ------------------------------------------------------------------ helpers

/// A scratch directory removed when the test ends (declare it first, so the
/// leases using it are dropped before it).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        slack_kit::remove_data_dir(&self.0);
    }
}

fn engine(kind: BackendKind) -> (Scratch, Engine) {
    let dir = gwkit::fresh_dir("artifacts");
    let cfg = EngineConfig {
        data_dir: dir.join("data"),
        runtime_dir: gwkit::scratch().join("run"),
        init_path: gwkit::init_path(),
    };
    let e = Engine::new(cfg, kind).expect("a sandbox engine");
    (Scratch(dir), e)
}

fn lease(e: &Engine, kind: BackendKind) -> Lease {
    let policy = SandboxPolicy {
        backend: kind,
        ..SandboxPolicy::default()
    };
    e.lease(policy, LeaseOptions::default()).expect("a lease")
}

/// Runs `script` with `sh -c` in the lease; panics unless it exits 0.
fn sh(l: &mut Lease, script: &str) -> String {
    let mut out = Vec::new();
    let o = l
        .run(
            RunSpec::new(["/bin/sh", "-c", script]),
            &mut |_: Stream, b| out.extend_from_slice(b),
        )
        .expect("the sandbox ran the command");
    let text = String::from_utf8_lossy(&out).into_owned();
    assert_eq!(o.exit_code(), 0, "{script}\n{text}");
    text
}

/// What the host sees of a file: bytes, mode, mtime, atime (ns).
fn fingerprint(p: &Path) -> (Vec<u8>, u32, i128, i128) {
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let bytes = std::fs::read(p).unwrap();
    let ns = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
    (
        bytes,
        m.mode(),
        ns(m.mtime(), m.mtime_nsec()),
        ns(m.atime(), m.atime_nsec()),
    )
}

/// Metadata without reading the file (reading would move the access time).
fn stat_only(p: &Path) -> (u32, i128, i128, u64) {
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let ns = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
    (
        m.mode(),
        ns(m.mtime(), m.mtime_nsec()),
        ns(m.atime(), m.atime_nsec()),
        m.size(),
    )
}

/// Sets a file's access time to 2000-01-01, before its mtime: with the
/// `relatime` (or `strictatime`) mounts used here, any read moves it.
fn age_atime(p: &Path) {
    let t = nix::sys::time::TimeSpec::new(946_684_800, 0);
    nix::sys::stat::utimensat(
        None,
        p,
        &t,
        &nix::sys::time::TimeSpec::UTIME_OMIT,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .expect("setting an access time");
    assert_eq!(stat_only(p).2, 946_684_800_000_000_000);
}

/// Proves the probe: reading a file with an aged atime moves it.
fn atime_moves_on_read(dir: &Path) {
    let p = dir.join("atime-probe");
    std::fs::write(&p, "probe").unwrap();
    age_atime(&p);
    let _ = std::fs::read(&p).unwrap();
    assert_ne!(
        stat_only(&p).2,
        946_684_800_000_000_000,
        "a read does not move the access time on {}: the never-read checks would prove nothing",
        dir.display()
    );
    std::fs::remove_file(&p).unwrap();
}

/// A host file with a random marker and an aged access time, in a directory
/// the sandbox user could reach if it were not isolated (mode 0755/0644).
fn host_secret(dir: &Path) -> (PathBuf, String) {
    use std::os::unix::fs::PermissionsExt;
    let d = dir.join("host");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    atime_moves_on_read(&d);
    let marker = format!("HOST-SECRET-{}", gwkit::random_hex(12));
    let p = d.join("secret.txt");
    std::fs::write(&p, &marker).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    age_atime(&p);
    (p, marker)
}

fn names(c: &Collected) -> Vec<&str> {
    c.files.iter().map(|f| f.name.as_str()).collect()
}

fn refused(c: &Collected) -> Vec<(&str, &Refusal)> {
    c.refused.iter().map(|(n, r)| (n.as_str(), r)).collect()
}

/// The entries left in the lease's `~/artifacts`, seen from the host.
fn left_in(l: &Lease) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(l.home_dir().join("artifacts")) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => return vec!["<no ~/artifacts>".into()],
    };
    v.sort();
    v
}

fn sha256_hex(b: &[u8]) -> String {
    slack_kit::sha256_hex(b)
}

/// One test per backend: `mod bwrap` and `mod gvisor`.
macro_rules! both_backends {
    ($($name:ident => $body:expr;)*) => {
        mod bwrap {
            #[allow(unused_imports)]
            use super::*;
            $( #[test] fn $name() { ($body)(BackendKind::Bwrap) } )*
        }
        mod gvisor {
            #[allow(unused_imports)]
            use super::*;
            $( #[test] fn $name() { ($body)(BackendKind::Gvisor) } )*
        }
    };
}

// ------------------------------------------------------------------ collect

both_backends! {
    collects_regular_files_removes_them_and_sends_nothing_twice => |kind| {
        let (_s, e) = engine(kind);
        let mut l = lease(&e, kind);
        let a = format!("alpha {}\n", gwkit::random_hex(8));
        sh(&mut l, &format!(
            "mkdir -p ~/artifacts && printf '%s\\n' '{}' > ~/artifacts/a.txt && \
             head -c 70000 /dev/urandom > ~/artifacts/b.bin && cp ~/artifacts/b.bin /workspace/b.copy",
            a.trim_end()
        ));
        let b = std::fs::read(l.workspace_dir().join("b.copy")).unwrap();
        let c = collect(&l, &ArtifactLimits::default());
        assert_eq!(names(&c), ["a.txt", "b.bin"], "{c:?}");
        assert!(c.refused.is_empty(), "{:?}", c.refused);
        assert_eq!(c.files[0].bytes.as_ref(), a.as_bytes());
        assert_eq!(c.files[1].bytes.as_ref(), &b[..]);
        assert_eq!(c.files[1].size(), 70_000);
        assert_eq!(c.files[1].sha256, sha256_hex(&b));
        // Taken out of the outbox: the host and the sandbox see it empty.
        assert!(left_in(&l).is_empty(), "{:?}", left_in(&l));
        // (`find`, not `ls`: coreutils' statx flags get EINVAL from this runsc.)
        assert_eq!(sh(&mut l, "find ~/artifacts -mindepth 1; echo end"), "end\n");
        let again = collect(&l, &ArtifactLimits::default());
        assert!(again.is_empty(), "sent twice: {again:?}");
        // No ~/artifacts at all: nothing, and nothing refused.
        sh(&mut l, "rmdir ~/artifacts");
        assert!(collect(&l, &ArtifactLimits::default()).is_empty());
    };

    attack_f3_symlink_to_etc_shadow_is_refused_and_not_followed => |kind| {
        let (s, e) = engine(kind);
        let shadow = Path::new("/etc/shadow");
        let shadow_before = fingerprint(shadow);
        let (secret, marker) = host_secret(&s.0);
        let secret_before = stat_only(&secret);
        let mut l = lease(&e, kind);
        sh(&mut l, &format!(
            "mkdir -p ~/artifacts && cd ~/artifacts && ln -s /etc/shadow shadow && \
             ln -s {} host && ln -s / root && ln -s ../../../../../../etc/passwd up && \
             echo ok > ok.txt",
            secret.display()
        ));
        let c = collect(&l, &ArtifactLimits::default());
        assert_eq!(names(&c), ["ok.txt"], "{c:?}");
        assert_eq!(
            refused(&c),
            [("host", &Refusal::Symlink), ("root", &Refusal::Symlink),
             ("shadow", &Refusal::Symlink), ("up", &Refusal::Symlink)]
        );
        assert!(c.refusal_lines(20).contains(&"moat did not send `shadow`: it is a symbolic link (artifacts must be regular files in ~/artifacts)".to_string()));
        for f in &c.files {
            assert_ne!(f.bytes.as_ref(), &shadow_before.0[..], "/etc/shadow would be sent");
            assert!(!String::from_utf8_lossy(&f.bytes).contains(&marker));
        }
        // The links are gone; what they pointed at is untouched and unread.
        assert!(left_in(&l).is_empty(), "{:?}", left_in(&l));
        assert_eq!(fingerprint(shadow), shadow_before, "/etc/shadow changed");
        assert_eq!(stat_only(&secret), secret_before, "the host file was read or changed");
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), marker);
    };

    attack_f3_symlink_to_another_lease_is_refused => |kind| {
        let (_s, e) = engine(kind);
        let mut other = lease(&e, kind);
        let marker = format!("OTHER-LEASE-{}", gwkit::random_hex(12));
        sh(&mut other, &format!("printf {marker} > ~/secret.txt && printf {marker} > /workspace/w.txt"));
        let their_home = other.home_dir().join("secret.txt");
        let their_ws = other.workspace_dir().join("w.txt");
        age_atime(&their_home);
        age_atime(&their_ws);
        let before = (stat_only(&their_home), stat_only(&their_ws));
        let mut l = lease(&e, kind);
        // The first lease cannot even see these paths: the links are made by name.
        let seen = sh(&mut l, &format!("cat {} 2>&1 || echo unseen", their_home.display()));
        assert!(seen.contains("unseen") && !seen.contains(&marker), "{seen}");
        sh(&mut l, &format!(
            "mkdir -p ~/artifacts && ln -s {} ~/artifacts/theirs && ln -s {} ~/artifacts/their-ws && \
             ln -s {} ~/artifacts/their-home",
            their_home.display(), their_ws.display(), other.home_dir().display()
        ));
        let c = collect(&l, &ArtifactLimits::default());
        assert!(c.files.is_empty(), "{c:?}");
        assert_eq!(
            refused(&c),
            [("their-home", &Refusal::Symlink), ("their-ws", &Refusal::Symlink),
             ("theirs", &Refusal::Symlink)]
        );
        assert!(left_in(&l).is_empty());
        assert_eq!((stat_only(&their_home), stat_only(&their_ws)), before, "the other lease's files were read or changed");
        assert_eq!(sh(&mut other, "cat ~/secret.txt"), marker);
    };

    // The targets are decoys this test owns (a root-owned directory shaped
    // like /etc, and another lease's home), never the host's /etc itself: a
    // collector that followed the link would remove what it found there.
    attack_f3_artifacts_dir_that_is_a_link_is_refused_and_nothing_read_or_removed => |kind| {
        use std::os::unix::fs::PermissionsExt;
        let (s, e) = engine(kind);
        let (secret, marker) = host_secret(&s.0);
        let decoy = secret.parent().unwrap().to_path_buf();
        std::os::unix::fs::symlink("/etc/hostname", decoy.join("hostname")).unwrap();
        std::fs::create_dir(decoy.join("empty.d")).unwrap();
        std::fs::set_permissions(decoy.join("empty.d"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let listing = |d: &Path| {
            let mut v: Vec<_> = std::fs::read_dir(d).unwrap().flatten().map(|e| e.file_name()).collect();
            v.sort();
            v
        };
        let decoy_before = (listing(&decoy), stat_only(&secret));
        let mut other = lease(&e, kind);
        sh(&mut other, &format!("printf {marker} > ~/theirs.txt"));
        let theirs = other.home_dir().join("theirs.txt");
        age_atime(&theirs);
        let other_before = (listing(&other.home_dir()), stat_only(&theirs));
        let mut l = lease(&e, kind);
        for target in [decoy.clone(), other.home_dir()] {
            sh(&mut l, &format!("rm -rf ~/artifacts; ln -s {} ~/artifacts", target.display()));
            let c = collect(&l, &ArtifactLimits::default());
            assert!(c.files.is_empty(), "{c:?}");
            assert_eq!(refused(&c), [("~/artifacts", &Refusal::DirIsLink)]);
            assert!(c.refusal_lines(20)[0].starts_with("moat did not send `~/artifacts`: ~/artifacts is a symbolic link"));
            // The link itself is removed; its target is not.
            assert!(std::fs::symlink_metadata(l.home_dir().join("artifacts")).is_err());
            assert!(target.is_dir());
        }
        assert_eq!((listing(&decoy), stat_only(&secret)), decoy_before, "the decoy was read or changed");
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), marker);
        assert_eq!((listing(&other.home_dir()), stat_only(&theirs)), other_before, "the other lease was read or changed");
    };

    a_hard_link_is_refused_unread_and_its_other_name_kept => |kind| {
        let (_s, e) = engine(kind);
        let mut l = lease(&e, kind);
        // A link from /workspace crosses a mount point: the kernel refuses it
        // (EXDEV) on bwrap; if a backend allowed it, moat must refuse it too.
        let out = sh(
            &mut l,
            "mkdir -p ~/artifacts && echo keep-ws > /workspace/f && \
             (ln /workspace/f ~/artifacts/w 2>/dev/null && echo linked || echo cross-mount-refused) && \
             echo keep-me > ~/f && ln ~/f ~/artifacts/f && echo fine > ~/artifacts/g",
        );
        let home = l.home_dir().join("f");
        let ws = l.workspace_dir().join("f");
        age_atime(&home);
        age_atime(&ws);
        let before = (stat_only(&home), stat_only(&ws));
        let c = collect(&l, &ArtifactLimits::default());
        assert_eq!(names(&c), ["g"]);
        let mut expect = vec![("f", &Refusal::HardLink { links: 2 })];
        if out.contains("linked") {
            expect.push(("w", &Refusal::HardLink { links: 2 }));
        } else {
            assert!(out.contains("cross-mount-refused"), "{out}");
        }
        assert_eq!(refused(&c), expect);
        assert!(left_in(&l).is_empty());
        assert_eq!((stat_only(&home), stat_only(&ws)), before, "a linked file was read or changed");
        assert_eq!(sh(&mut l, "cat ~/f /workspace/f"), "keep-me\nkeep-ws\n");
    };

    a_fifo_is_refused_without_blocking => |kind| {
        let (_s, e) = engine(kind);
        let mut l = lease(&e, kind);
        sh(&mut l, "mkdir -p ~/artifacts && mkfifo ~/artifacts/pipe && echo after > ~/artifacts/z.txt");
        // bwrap makes the FIFO on the host; gVisor keeps it inside its own
        // kernel, and the host has no FIFO to trip over.
        let on_host = std::fs::symlink_metadata(l.home_dir().join("artifacts/pipe"))
            .map(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()))
            .unwrap_or(false);
        assert_eq!(on_host, kind == BackendKind::Bwrap, "where the FIFO lives");
        let t0 = Instant::now();
        let c = collect(&l, &ArtifactLimits::default());
        assert!(t0.elapsed() < Duration::from_secs(2), "collect took {:?}", t0.elapsed());
        assert_eq!(names(&c), ["z.txt"]);
        if on_host {
            assert_eq!(refused(&c), [("pipe", &Refusal::Fifo)]);
        } else {
            assert!(c.refused.is_empty(), "{:?}", c.refused);
        }
        assert!(left_in(&l).is_empty());
    };

    a_file_over_max_bytes_is_refused_and_one_at_the_limit_sent => |kind| {
        let (_s, e) = engine(kind);
        let mut l = lease(&e, kind);
        sh(&mut l, "mkdir -p ~/artifacts && head -c 11534336 /dev/zero > ~/artifacts/big.bin && head -c 10485760 /dev/zero > ~/artifacts/edge.bin");
        let c = collect(&l, &ArtifactLimits::default());
        assert_eq!(names(&c), ["edge.bin"]);
        assert_eq!(c.files[0].size(), 10 << 20);
        assert_eq!(refused(&c), [("big.bin", &Refusal::TooBig { size: 11 << 20, limit: 10 << 20 })]);
        assert_eq!(
            c.refusal_lines(20),
            ["moat did not send `big.bin`: it is larger than 10 MiB (the channel's artifacts.max_bytes)"]
        );
        assert!(left_in(&l).is_empty());
    };

    twelve_files_send_ten_and_report_two => |kind| {
        let (_s, e) = engine(kind);
        let mut l = lease(&e, kind);
        sh(&mut l, "mkdir -p ~/artifacts && for i in $(seq -w 1 12); do echo $i > ~/artifacts/f$i.txt; done");
        let c = collect(&l, &ArtifactLimits::default());
        let expect: Vec<String> = (1..=10).map(|i| format!("f{i:02}.txt")).collect();
        assert_eq!(names(&c), expect);
        for (i, f) in c.files.iter().enumerate() {
            assert_eq!(f.bytes.as_ref(), format!("{:02}\n", i + 1).as_bytes());
        }
        assert_eq!(
            refused(&c),
            [("f11.txt", &Refusal::TooMany { limit: 10 }), ("f12.txt", &Refusal::TooMany { limit: 10 })]
        );
        assert!(left_in(&l).is_empty());
    };

    names_with_control_characters_are_refused_and_shown_escaped => |kind| {
        let (_s, e) = engine(kind);
        let mut l = lease(&e, kind);
        sh(&mut l, r#"mkdir -p ~/artifacts && cd ~/artifacts &&
            echo 1 > "$(printf 'bad\nname')" && echo 2 > "$(printf 'esc\033[31mred')" &&
            echo 3 > "$(printf 'gpj\342\200\256exe')" && echo 4 > "$(printf 'raw\377byte')" &&
            echo 5 > 'tick`name.txt' && echo 6 > 'résumé.txt'"#);
        let c = collect(&l, &ArtifactLimits::default());
        let mut sent = names(&c);
        sent.sort();
        assert_eq!(sent, ["résumé.txt", "tick`name.txt"]);
        let mut shown: Vec<(&str, &Refusal)> = refused(&c);
        shown.sort_by_key(|s| s.0);
        assert_eq!(
            shown,
            [("bad\\nname", &Refusal::BadName), ("esc\\u{1b}[31mred", &Refusal::BadName),
             ("gpj\\u{202e}exe", &Refusal::BadName), ("raw\u{fffd}byte", &Refusal::BadName)]
        );
        for line in c.refusal_lines(20) {
            assert!(!line.chars().any(|ch| ch.is_control()), "{line:?}");
        }
        assert!(left_in(&l).is_empty(), "{:?}", left_in(&l));
    };

    subdirectories_are_not_recursed_into => |kind| {
        let (_s, e) = engine(kind);
        let mut l = lease(&e, kind);
        sh(&mut l, "mkdir -p ~/artifacts/sub ~/artifacts/empty && echo inner > ~/artifacts/sub/inner.txt && echo top > ~/artifacts/top.txt");
        let c = collect(&l, &ArtifactLimits::default());
        assert_eq!(names(&c), ["top.txt"]);
        assert_eq!(refused(&c), [("empty", &Refusal::Directory), ("sub", &Refusal::Directory)]);
        // An empty one is removed; a full one stays for the agent to sort out.
        assert_eq!(left_in(&l), ["sub"]);
        assert_eq!(sh(&mut l, "cat ~/artifacts/sub/inner.txt"), "inner\n");
    };

    limits_are_the_channels => |kind| {
        let (_s, e) = engine(kind);
        let mut l = lease(&e, kind);
        sh(&mut l, "mkdir -p ~/artifacts && printf 12345 > ~/artifacts/a && printf 1234 > ~/artifacts/b && printf 12 > ~/artifacts/c");
        let c = collect(&l, &ArtifactLimits { max_files: 1, max_bytes: 4 });
        assert_eq!(names(&c), ["b"]);
        assert_eq!(c.files[0].bytes.as_ref(), b"1234");
        assert_eq!(
            refused(&c),
            [("a", &Refusal::TooBig { size: 5, limit: 4 }), ("c", &Refusal::TooMany { limit: 1 })]
        );
        assert!(left_in(&l).is_empty());
    };
}

// ------------------------------------------------------------------ Slack

const ALICE: &str = "U0ALICE1";
const GENERAL: &str = "C0GENERAL";

fn slack_rest(mode: &str) -> String {
    format!(
        "[pool]\nsize = 1\n\n[defaults]\ndebounce = \"100ms\"\n\n[[channel]]\nplatform = \"slack\"\n\
         id = \"*\"\nusers = [\"{ALICE}\"]\nsandbox = \"{mode}\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_a_turns_artifact_is_uploaded_into_its_thread_and_a_left_symlink_is_told() {
    use slack_kit::*;
    let fake = FakeSlack::start().await;
    let data = data_dir("artifacts-pool");
    let gw = Running::start(
        &config(&fake, &data, Mode::Events, &slack_rest("pool")),
        &data,
    )
    .await;

    let mark = gwkit::random_hex(8);
    let report = format!("report {mark}\n");
    let ts = new_ts();
    let cmd = format!(
        "mkdir -p ~/artifacts && printf 'report %s\\n' {mark} > ~/artifacts/report.txt && \
         ln -s /etc/shadow ~/artifacts/shadow && echo made-{mark}"
    );
    let body = fake.callback(&new_event_id(), mention(GENERAL, ALICE, &ts, None, &cmd));
    assert_eq!(post_signed(gw.events(), &body).await.status, 200);

    let answer = fake.wait_post(GENERAL, &ts, &format!("made-{mark}")).await;
    assert!(
        answer.text().contains("moat did not send `shadow`: it is a symbolic link (artifacts must be regular files in ~/artifacts)"),
        "the refusal is told in the thread: {}",
        answer.text()
    );
    let calls = fake
        .wait_for("the ✅ reaction", Duration::from_secs(60), |calls| {
            calls
                .iter()
                .any(|c| c.method == "reactions.add" && c.arg("name") == Some("white_check_mark"))
                .then(|| calls.to_vec())
        })
        .await;
    // Exactly one file went up, into the mention's thread, with the right bytes.
    assert_eq!(
        uploads(&calls, GENERAL, &ts),
        [(
            "report.txt".to_string(),
            report.len() as u64,
            sha256_hex(report.as_bytes())
        )],
        "{}",
        summary(&calls)
    );
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.method == "files.getUploadURLExternal")
            .count(),
        1
    );
    assert!(
        calls
            .iter()
            .filter(|c| c.method == "upload")
            .all(|c| c.authorization.is_none()),
        "the bot token went to the upload URL"
    );
    // The upload is complete before the turn is marked done.
    let completed = calls
        .iter()
        .position(|c| c.method == "files.completeUploadExternal")
        .unwrap();
    let done = calls
        .iter()
        .position(|c| c.method == "reactions.add" && c.arg("name") == Some("white_check_mark"))
        .unwrap();
    assert!(completed < done, "{}", summary(&calls));

    // Audited: name, size, hash; the refusal with its reason; never contents.
    let recs = gw.audit();
    let sent: Vec<&Value> = recs.iter().filter(|r| r["kind"] == "artifact").collect();
    assert_eq!(sent.len(), 1, "{recs:#?}");
    assert_eq!(sent[0]["name"], "report.txt");
    assert_eq!(sent[0]["bytes"], report.len() as u64);
    assert_eq!(sent[0]["sha256"], sha256_hex(report.as_bytes()));
    let refused: Vec<&Value> = recs
        .iter()
        .filter(|r| r["kind"] == "artifact-refused")
        .collect();
    assert_eq!(refused.len(), 1, "{recs:#?}");
    assert_eq!(refused[0]["name"], "shadow");
    assert_eq!(refused[0]["reason"], "symlink");
    let log = std::fs::read_to_string(gw.audit_path()).unwrap();
    assert!(
        !log.contains(&format!("report {mark}")),
        "an artifact's contents are in the audit log"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_per_thread_artifacts_are_sent_once_and_removed_from_the_kept_sandbox() {
    use slack_kit::*;
    let fake = FakeSlack::start().await;
    let data = data_dir("artifacts-thread");
    let gw = Running::start(
        &config(&fake, &data, Mode::Events, &slack_rest("per-thread")),
        &data,
    )
    .await;
    let say = |ts: String, parent: Option<String>, text: String| {
        let body = fake.callback(
            &new_event_id(),
            mention(GENERAL, ALICE, &ts, parent.as_deref(), &text),
        );
        let addr = gw.events();
        async move { assert_eq!(post_signed(addr, &body).await.status, 200) }
    };
    let root = new_ts();
    say(
        root.clone(),
        None,
        "mkdir -p ~/artifacts && echo one > ~/artifacts/one.txt && echo wrote-$((6*7))".into(),
    )
    .await;
    fake.wait_post(GENERAL, &root, "wrote-42").await;
    say(
        new_ts(),
        Some(root.clone()),
        "ls -A ~/artifacts; echo listed-$((6*7))".into(),
    )
    .await;
    let second = fake.wait_post(GENERAL, &root, "listed-42").await;
    assert!(
        !second.text().contains("one.txt"),
        "the sent file stayed in ~/artifacts: {}",
        second.text()
    );
    let calls = fake.calls();
    assert_eq!(
        uploads(&calls, GENERAL, &root),
        [("one.txt".to_string(), 4, sha256_hex(b"one\n"))],
        "{}",
        summary(&calls)
    );
    gw.stop().await;
}

// ------------------------------------------------------------------ web

/// A GET with a bearer token: status, headers (lower-case names), body bytes.
fn get_raw(
    addr: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(gwkit::WAIT)).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = raw[end + 4..].to_vec();
    (status, headers, body)
}

#[test]
fn web_an_artifact_event_appears_and_only_its_owner_downloads_it() {
    const TOKENS: &str = "TEST_ARTIFACT_TOKENS";
    let (ta, tb) = (gwkit::random_hex(16), gwkit::random_hex(16));
    let gw = gwkit::Gw::start_with(
        "artifacts-web",
        &gwkit::web_config(
            1,
            &format!("auth = \"token\"\ntoken_env = \"{TOKENS}\""),
            "users = [\"alice\", \"bob\"]\ndebounce = \"0ms\"",
        ),
        vec![(TOKENS.to_string(), format!("alice:{ta},bob:{tb}"))],
    );
    let alice = gw.client(Some(&ta));
    let bob = gw.client(Some(&tb));
    let mark = gwkit::random_hex(8);
    let page = format!("<script>alert('{mark}')</script>\n");
    let r = alice.post(
        "art",
        &format!("mkdir -p ~/artifacts && printf \"%s\\n\" \"<script>alert('{mark}')</script>\" > ~/artifacts/page.html && ln -s /etc/shadow ~/artifacts/s && echo ok"),
    );
    assert_eq!(r.status, 202, "{r:?}");
    let mut sse = alice.events("art").expect("alice's events");
    let evs = sse.answers(1);
    let arts: Vec<&Value> = evs
        .iter()
        .filter(|v| gwkit::kind(v) == "artifact")
        .collect();
    assert_eq!(arts.len(), 1, "{evs:#?}");
    let a = arts[0];
    assert_eq!(a["name"], "page.html");
    assert_eq!(a["size"], page.len() as u64);
    assert_eq!(a["sha256"], sha256_hex(page.as_bytes()));
    let (answer, ok) = gwkit::answers_of(&evs).remove(0);
    assert!(ok, "{answer}");
    assert!(
        answer.contains("moat did not send `s`: it is a symbolic link"),
        "{answer}"
    );
    let url = a["url"].as_str().expect("a download address").to_string();
    assert!(
        url.starts_with("/api/conversations/art/artifacts/"),
        "{url}"
    );

    // The owner gets the bytes, as an attachment that never runs as a page.
    let (status, headers, body) = get_raw(gw.web, &url, Some(&ta));
    assert_eq!(status, 200);
    assert_eq!(body, page.as_bytes());
    let h = |k: &str| {
        headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(h("content-type"), Some("application/octet-stream"));
    assert!(
        h("content-disposition")
            .is_some_and(|v| v.starts_with("attachment;") && v.contains("page.html")),
        "{headers:?}"
    );
    assert_eq!(h("x-content-type-options"), Some("nosniff"));
    assert!(h("content-security-policy").is_some_and(|v| v.contains("sandbox")));

    // Nobody else: another user (even with a conversation of the same name),
    // no identity, a made-up id.
    assert_eq!(get_raw(gw.web, &url, Some(&tb)).0, 404);
    assert_eq!(bob.post("art", "echo bob").status, 202);
    let mut bsse = bob.events("art").expect("bob's events");
    let bevs = bsse.answers(1);
    assert!(
        bevs.iter().all(|v| gwkit::kind(v) != "artifact"),
        "{bevs:#?}"
    );
    let (s, _, b) = get_raw(gw.web, &url, Some(&tb));
    assert_eq!(s, 404);
    assert!(!String::from_utf8_lossy(&b).contains(&mark));
    assert_eq!(get_raw(gw.web, &url, None).0, 401);
    let fake_id = format!("/api/conversations/art/artifacts/{}", gwkit::random_hex(16));
    assert_eq!(get_raw(gw.web, &fake_id, Some(&ta)).0, 404);

    let recs = gw.audit_kind("artifact");
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(recs[0]["name"], "page.html");
    drop((sse, bsse));
    gw.stop();
}
