//! `moat audit verify` and `moat audit tail` on the log a real sandbox run
//! wrote through its egress door: a clean log is ok, and a changed record, a
//! deleted middle record and a cut tail are each found, naming the line.

mod netkit;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use netkit::*;
use serde_json::Value;

fn moat(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moat"))
        .env("MOAT_DATA_DIR", data)
        .env_remove("MOAT_LOG")
        .stdin(Stdio::null())
        .args(args)
        .output()
        .expect("running moat")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A copy of the log and its head file in a directory of its own.
fn copy_log(log: &Path, name: &str) -> PathBuf {
    let (dir, _) = fresh_dir(name);
    let to = dir.join("audit.jsonl");
    std::fs::copy(log, &to).unwrap();
    let mut head = log.as_os_str().to_owned();
    head.push(".head");
    std::fs::copy(&head, dir.join("audit.jsonl.head")).unwrap();
    to
}

fn lines_of(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(p: &Path, lines: &[String]) {
    std::fs::write(
        p,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

/// `moat audit verify --file p` fails (exit 1) with all of `want` in its message.
fn assert_found(data: &Path, p: &Path, want: &[&str]) {
    let o = moat(data, &["audit", "verify", "--file", p.to_str().unwrap()]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "verify passed: {o:?}");
    assert!(err.starts_with("moat: audit log check failed: "), "{err}");
    for w in want {
        assert!(err.contains(w), "{err:?} lacks {w:?}");
    }
}

#[test]
fn verify_finds_changed_deleted_and_cut_records_in_a_doors_log() {
    let b = Backend::Bwrap;
    if !b.available() {
        return;
    }
    let up = Upstream::loopback();
    let p = up.port;
    let mut sb = Sandbox::new(b, "audit");
    sb.allow(&format!("web.test:{p}"))
        .pin("web.test", "127.0.0.1")
        .pin("other.test", "127.0.0.1");
    // Two runs: the second continues the first one's chain.
    for run in 0..2 {
        let pr = sb
            .sh(&format!(
                "t ok curl -sS -m 10 -f http://web.test:{p}/run{run}\n\
                 t off curl -sS -m 10 -f http://other.test:{p}/run{run}\n"
            ))
            .probes();
        pr.succeeded("ok", "upstream-ok GET /run");
        pr.failed("off", None, "");
    }
    let data = sb.dir.join("data");
    let log = data.join("audit").join("audit.jsonl");
    assert!(
        !data.join("audit").join("egress.jsonl").exists(),
        "the old name"
    );
    let lines = lines_of(&log);
    let n = lines.len();
    assert!(n >= 4, "two allowed and two denied requests: {lines:#?}");
    let records: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["seq"], i as u64 + 1, "{r}");
        assert!(r["kind"].is_string() && r["ts_ms"].is_u64(), "{r}");
    }
    let denied = records
        .iter()
        .position(|r| r["verdict"] == "denied" && r["host"] == "other.test")
        .expect("a denied record");
    let last_hash = records[n - 1]["hash"].as_str().unwrap().to_string();

    // The clean log, at the default path (from MOAT_DATA_DIR).
    let o = moat(&data, &["audit", "verify"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(
        text(&o.stdout).trim_end(),
        format!("ok: {n} records, last seq {n}, head hash {last_hash}")
    );

    // tail -n 2: the last two records, as JSON lines.
    let o = moat(&data, &["audit", "tail", "-n", "2"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let out = text(&o.stdout);
    let tailed: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(tailed, records[n - 2..].to_vec(), "{out}");
    let o = moat(&data, &["audit", "tail"]);
    assert_eq!(text(&o.stdout).lines().count(), n.min(20));

    // A denial turned into an allowance: its hash no longer matches.
    let changed = copy_log(&log, "audit-changed");
    let mut ls = lines.clone();
    assert!(ls[denied].contains("\"verdict\":\"denied\""));
    ls[denied] = ls[denied].replace("\"verdict\":\"denied\"", "\"verdict\":\"allowed\"");
    write_lines(&changed, &ls);
    let at = format!("line {} (seq {})", denied + 1, denied + 1);
    assert_found(&data, &changed, &[&at, "changed after it was written"]);

    // A middle record deleted: the next one's seq gives it away.
    let deleted = copy_log(&log, "audit-deleted");
    let mut ls = lines.clone();
    ls.remove(1);
    write_lines(&deleted, &ls);
    assert_found(
        &data,
        &deleted,
        &["line 2 (seq 3)", "expected seq 2", "deleted"],
    );

    // The last record deleted: only the head file knows.
    let cut = copy_log(&log, "audit-cut");
    let mut ls = lines.clone();
    ls.pop();
    write_lines(&cut, &ls);
    let at = format!("line {n} (seq {n})");
    assert_found(&data, &cut, &[&at, "cut from the end"]);

    // And a door refuses to continue a cut log rather than bury the evidence.
    let cut_data = cut.parent().unwrap().join("data");
    std::fs::create_dir_all(cut_data.join("audit")).unwrap();
    std::fs::copy(&cut, cut_data.join("audit").join("audit.jsonl")).unwrap();
    std::fs::copy(
        cut.with_extension("jsonl.head"),
        cut_data.join("audit").join("audit.jsonl.head"),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_moat"))
        .env("MOAT_DATA_DIR", &cut_data)
        .env("MOAT_RUNTIME_DIR", cut.parent().unwrap().join("run"))
        .stdin(Stdio::null())
        .args(["sandbox", "run", "--allow-domain", "web.test", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125), "{o:?}");
    assert!(text(&o.stderr).contains("cut from the end"), "{o:?}");
    assert_eq!(
        std::fs::read(cut_data.join("audit").join("audit.jsonl")).unwrap(),
        std::fs::read(&cut).unwrap(),
        "nothing appended to a broken log"
    );

    // The original is still whole.
    let o = moat(&data, &["audit", "verify", "--file", log.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
}

#[test]
fn verify_and_tail_name_a_missing_log() {
    let (dir, _) = fresh_dir("audit-missing");
    let o = moat(&dir, &["audit", "verify"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = text(&o.stderr);
    assert!(
        err.contains(&dir.join("audit").join("audit.jsonl").display().to_string()),
        "{err}"
    );
    let o = moat(&dir, &["audit", "tail", "-n", "2"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
}
