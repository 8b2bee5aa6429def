//! Group folders, global memory and per-channel mounts end to end through
//! the web chat (docs/memory.md; docs/threat-model.md M1, M2, M3), on both
//! backends: each web user is a channel of their own (`id = "alice"`), the
//! shell agent runs each message as a command, and the host side of every
//! folder is read directly to check what changed.

mod gwkit;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use gwkit::*;

const TOKENS_ENV: &str = "TEST_WEB_TOKENS";

struct Tokens {
    alice: String,
    bob: String,
    root: String,
}

fn tokens() -> (Tokens, Vec<(String, String)>) {
    let t = Tokens {
        alice: random_hex(16),
        bob: random_hex(16),
        root: random_hex(16),
    };
    let env = format!("alice:{},bob:{},root:{}", t.alice, t.bob, t.root);
    (t, vec![(TOKENS_ENV.to_string(), env)])
}

/// A gateway configuration: token auth, one `[[channel]]` per web user
/// (`alice` in the pool, `bob` per thread, `root` an admin channel), on
/// `backend`, with `top` (e.g. `[memory]`) and `alice_extra` lines.
fn config(backend: &str, top: &str, alice_extra: &str) -> String {
    format!(
        "{top}\n[web]\nlisten = \"127.0.0.1:0\"\nauth = \"token\"\ntoken_env = \"{TOKENS_ENV}\"\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n[pool]\nsize = 1\n\n\
         [defaults]\ndebounce = \"0ms\"\nbackend = \"{backend}\"\n\n\
         [[channel]]\nplatform = \"web\"\nid = \"alice\"\nusers = [\"alice\"]\n{alice_extra}\n\n\
         [[channel]]\nplatform = \"web\"\nid = \"bob\"\nusers = [\"bob\"]\nsandbox = \"per-thread\"\n\n\
         [[channel]]\nplatform = \"web\"\nid = \"root\"\nusers = [\"root\"]\ntrust = \"admin\"\n"
    )
}

/// Runs `cmd` as a turn in `thread` and returns the answer's text.
fn run(c: &Client, thread: &str, cmd: &str) -> String {
    let r = c.post(thread, cmd);
    assert_eq!(r.status, 202, "{r:?}");
    let mut sse = c.events(thread).expect("the event stream");
    let evs = sse.answers(1);
    answers_of(&evs).pop().expect("an answer").0
}

/// Every file below `dir` with its bytes and mode, for before/after checks.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>, u32)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let bytes = if m.is_file() {
                std::fs::read(&p).unwrap()
            } else {
                Vec::new()
            };
            if m.is_dir() {
                todo.push(p.clone());
            }
            out.push((p, bytes, m.permissions().mode()));
        }
    }
    out.sort();
    out
}

fn group(data: &Path, user: &str) -> PathBuf {
    data.join("groups").join(format!("web-{user}"))
}

/// One test per backend: `mod bwrap` and `mod gvisor`.
macro_rules! both_backends {
    ($($name:ident => $body:expr;)*) => {
        mod bwrap {
            #[allow(unused_imports)]
            use super::*;
            $( #[test] fn $name() { ($body)("bwrap") } )*
        }
        mod gvisor {
            #[allow(unused_imports)]
            use super::*;
            $( #[test] fn $name() { ($body)("gvisor") } )*
        }
    };
}

both_backends! {
    attack_m2_a_group_folder_is_kept_across_threads_and_restarts_and_invisible_to_other_channels => |backend| {
        let (t, secrets) = tokens();
        let data = fresh_dir(&format!("m2-{backend}")).join("data");
        let toml = config(backend, "", "");
        let gw = Gw::try_start_in(data.clone(), &toml, secrets.clone()).unwrap();
        let (alice, bob) = (gw.client(Some(&t.alice)), gw.client(Some(&t.bob)));
        let m = random_hex(8);
        // Alice (pool) and Bob (per thread) each write their own folder.
        let a = run(&alice, "a1", &format!("echo alice-{m} >> /workspace/group/notes.txt && echo ok"));
        assert_eq!(a, "ok\n");
        let b = run(&bob, "b1", &format!("echo bob-{m} >> /workspace/group/notes.txt && echo ok"));
        assert_eq!(b, "ok\n");
        // Another thread of the same channel finds it.
        assert_eq!(run(&alice, "a2", "cat /workspace/group/notes.txt"), format!("alice-{m}\n"));
        // The other channels see only their own folder, and no trace of Alice's.
        let probe = "cat /workspace/group/notes.txt; find /workspace -mindepth 1 -maxdepth 1; \
                     grep -rs alice- /workspace /home /tmp /run 2>/dev/null | head -3; echo end";
        let seen = run(&bob, "b2", probe);
        assert_eq!(seen, format!("bob-{m}\n/workspace/group\nend\n"), "bob saw: {seen}");
        let root = gw.client(Some(&t.root));
        let seen = run(&root, "r1", probe);
        assert!(!seen.contains("alice-") && seen.contains("No such file"), "root saw: {seen}");
        // On the host: each folder holds its own note, and nothing else's.
        let af = std::fs::read_to_string(group(&data, "alice").join("notes.txt")).unwrap();
        let bf = std::fs::read_to_string(group(&data, "bob").join("notes.txt")).unwrap();
        assert_eq!((af.as_str(), bf.as_str()), (format!("alice-{m}\n").as_str(), format!("bob-{m}\n").as_str()));
        assert!(!group(&data, "root").join("notes.txt").exists());
        gw.stop();

        // A restart keeps the folders, and the channels still write them.
        let gw = Gw::try_start_in(data.clone(), &toml, secrets).unwrap();
        let alice = gw.client(Some(&t.alice));
        let a = run(&alice, "a3", &format!("cat /workspace/group/notes.txt && echo again-{m} >> /workspace/group/notes.txt && echo ok"));
        assert_eq!(a, format!("alice-{m}\nok\n"));
        let bob = gw.client(Some(&t.bob));
        assert_eq!(run(&bob, "b3", "cat /workspace/group/notes.txt"), format!("bob-{m}\n"));
        // Bob's per-thread sandboxes are deleted when idle; the folder stays.
        let later = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
            + 25 * 3600 * 1000;
        assert!(gw.block_on(gw.gw.sweep_idle_at(later)) >= 1);
        assert_eq!(run(&bob, "b4", "cat /workspace/group/notes.txt"), format!("bob-{m}\n"));
        let af = std::fs::read_to_string(group(&data, "alice").join("notes.txt")).unwrap();
        assert_eq!(af, format!("alice-{m}\nagain-{m}\n"));
        gw.stop();
    };

    attack_m1_global_memory_is_read_only_outside_admin_channels => |backend| {
        let (t, secrets) = tokens();
        let dir = fresh_dir(&format!("m1-{backend}"));
        let global = dir.join("global");
        std::fs::create_dir(&global).unwrap();
        let m = random_hex(8);
        std::fs::write(global.join("MEMORY.md"), format!("global-{m}\n")).unwrap();
        // Open to every uid: only the read-only mount stands in the way.
        std::fs::set_permissions(&global, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(global.join("MEMORY.md"), std::fs::Permissions::from_mode(0o666)).unwrap();
        // The admin channel runs as the directory's owner: an ordinary user.
        std::os::unix::fs::chown(&global, Some(4242), Some(4242)).unwrap();
        std::os::unix::fs::chown(global.join("MEMORY.md"), Some(4242), Some(4242)).unwrap();
        let toml = config(backend, &format!("[memory]\nglobal = \"{}\"\n", global.display()), "");
        let gw = Gw::try_start_in(dir.join("data"), &toml, secrets).unwrap();
        let before = snapshot(&global);

        let attack = "cat /workspace/global/MEMORY.md; \
            echo evil >> /workspace/global/MEMORY.md; \
            touch /workspace/global/new; \
            mv /workspace/global/MEMORY.md /workspace/global/moved; \
            rm -f /workspace/global/MEMORY.md; \
            chmod 777 /workspace/global/MEMORY.md; \
            mkdir /workspace/global/d; \
            mount -o remount,rw /workspace/global; \
            echo end";
        for (who, token) in [("alice", &t.alice), ("bob", &t.bob)] {
            let c = gw.client(Some(token));
            let out = run(&c, &format!("{who}-1"), &format!("{{ {attack}; }} 2>&1"));
            assert!(out.starts_with(&format!("global-{m}\n")), "{who} could not read: {out}");
            assert!(out.ends_with("end\n"), "{out}");
            let refusals = out.matches("Read-only file system").count()
                + out.matches("Operation not permitted").count()
                + out.matches("Permission denied").count();
            assert!(refusals >= 6, "{who}: not every write was refused: {out}");
            assert!(out.contains("Read-only file system"), "{who}: {out}");
            assert_eq!(snapshot(&global), before, "{who} changed global memory");
        }

        // The admin channel writes it.
        let root = gw.client(Some(&t.root));
        let out = run(&root, "r1", &format!("echo admin-{m} >> /workspace/global/MEMORY.md && echo ok"));
        assert_eq!(out, "ok\n");
        assert_eq!(
            std::fs::read_to_string(global.join("MEMORY.md")).unwrap(),
            format!("global-{m}\nadmin-{m}\n")
        );
        gw.stop();
    };

    attack_m3_a_read_only_mount_cannot_be_written_and_the_allowlist_is_unseen => |backend| {
        let (t, secrets) = tokens();
        let dir = fresh_dir(&format!("m3-{backend}"));
        let srv = dir.join("srv");
        let repo = srv.join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        std::fs::write(repo.join("README"), "hello\n").unwrap();
        // Open to every uid: only the read-only mount stands in the way.
        std::fs::set_permissions(&srv, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(repo.join("README"), std::fs::Permissions::from_mode(0o666)).unwrap();
        let list = dir.join("mounts.toml");
        std::fs::write(&list, format!("[[root]]\npath = \"{}\"\n", srv.display())).unwrap();
        let toml = config(
            backend,
            &format!("[mounts]\nallowlist = \"{}\"\n", list.display()),
            &format!("mounts = [{{ host = \"{}\", at = \"/workspace/repo\", mode = \"ro\" }}]", repo.display()),
        );
        let gw = Gw::try_start_in(dir.join("data"), &toml, secrets).unwrap();
        let before = snapshot(&srv);
        let alice = gw.client(Some(&t.alice));
        let out = run(&alice, "a1", "{ cat /workspace/repo/README; echo x >> /workspace/repo/README; \
            touch /workspace/repo/new; cat /workspace/mounts.toml /workspace/../mounts.toml; echo end; } 2>&1");
        assert!(out.starts_with("hello\n") && out.ends_with("end\n"), "{out}");
        assert_eq!(out.matches("Read-only file system").count(), 2, "{out}");
        assert!(!out.contains("[[root]]"), "the allowlist was readable: {out}");
        assert_eq!(snapshot(&srv), before);
        // Bob's channel has no such mount.
        let bob = gw.client(Some(&t.bob));
        assert_eq!(run(&bob, "b1", "find /workspace -mindepth 1 -maxdepth 1"), "/workspace/group\n");
        gw.stop();
    };
}

/// The refusals at start: each names the key and the reason, and no
/// gateway starts.
#[test]
fn attack_m3_mounts_around_the_allowlist_are_refused_at_start() {
    let dir = fresh_dir("m3-refusals");
    let srv = dir.join("srv");
    let rw = srv.join("rw");
    let outside = dir.join("outside");
    for d in [&srv, &rw, &outside, &srv.join(".ssh"), &srv.join("ok")] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::os::unix::fs::symlink(&outside, srv.join("link")).unwrap();
    let list = dir.join("mounts.toml");
    std::fs::write(
        &list,
        format!(
            "blocked_patterns = [\"vault\"]\n[[root]]\npath = \"{}\"\n[[root]]\npath = \"{}\"\nwritable = true\n",
            srv.display(),
            rw.display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all(srv.join("vault")).unwrap();
    let allow = format!("[mounts]\nallowlist = \"{}\"\n", list.display());
    let (_t, secrets) = tokens();
    let refused = |top: &str, extra: &str| -> String {
        let toml = config("bwrap", top, extra);
        match Gw::try_start_in(fresh_dir("m3-refused").join("data"), &toml, secrets.clone()) {
            Ok(gw) => {
                gw.stop();
                panic!("the gateway started with {extra}")
            }
            Err(e) => e,
        }
    };
    let mount = |host: &Path, mode: &str| {
        format!(
            "mounts = [{{ host = \"{}\", at = \"/workspace/m\", mode = \"{mode}\" }}]",
            host.display()
        )
    };
    let key = "channel[0].mounts[0].host";
    let cases = [
        (
            allow.clone(),
            mount(&outside, "ro"),
            "outside the allowed roots",
        ),
        (allow.clone(), mount(&srv.join("link"), "ro"), "symlink"),
        (
            allow.clone(),
            mount(&srv.join(".ssh"), "ro"),
            "blocked pattern \".ssh\"",
        ),
        (
            allow.clone(),
            mount(&srv.join("vault"), "ro"),
            "blocked pattern \"vault\"",
        ),
        (
            allow.clone(),
            mount(&srv.join("ok"), "rw"),
            "read-only in the allowlist",
        ),
        (
            allow.clone(),
            mount(&dir.join("missing"), "ro"),
            "cannot be resolved",
        ),
    ];
    for (top, extra, why) in cases {
        let e = refused(&top, &extra);
        assert!(e.contains(key) && e.contains(why), "{extra}: {e}");
    }
    // Mounts need an allowlist at all.
    let e = refused("", &mount(&srv.join("ok"), "ro"));
    assert!(
        e.contains("channel[0].mounts") && e.contains("allowlist"),
        "{e}"
    );
    // An untrusted channel gets nothing writable.
    let e = refused(
        &allow,
        &format!("trust = \"untrusted\"\nadmins = []\n{}", mount(&rw, "rw")),
    );
    assert!(e.contains(key) && e.contains("untrusted"), "{e}");
    // A global memory directory that does not exist.
    let e = refused(
        &format!("[memory]\nglobal = \"{}\"\n", dir.join("nope").display()),
        "",
    );
    assert!(
        e.contains("memory.global") && e.contains("cannot be resolved"),
        "{e}"
    );
    // `..` is refused when the file is read.
    let toml = config(
        "bwrap",
        &allow,
        &format!(
            "mounts = [{{ host = \"{}/../outside\", at = \"/workspace/m\" }}]",
            srv.display()
        ),
    );
    let e = moat_policy::gateway::GatewayConfig::from_toml(&toml)
        .unwrap_err()
        .to_string();
    assert!(e.contains(key) && e.contains(".."), "{e}");
    // A good entry starts.
    let toml = config("bwrap", &allow, &mount(&rw, "rw"));
    Gw::try_start_in(dir.join("data"), &toml, secrets)
        .unwrap()
        .stop();
}
