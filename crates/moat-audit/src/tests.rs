use super::*;
use serde_json::json;
use std::sync::Arc;

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

/// A log with `n` records of kind "connect" (host h1, h2, ...).
fn log_with(n: u64) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("audit").join("audit.jsonl");
    let log = AuditLog::open(&p).unwrap();
    for i in 1..=n {
        let seq = log
            .append("connect", json!({"host": format!("h{i}"), "port": 443}))
            .unwrap();
        assert_eq!(seq, i);
    }
    (d, p)
}

fn problem(p: &Path) -> VerifyError {
    match verify(p) {
        Ok(r) => panic!("verify passed a tampered log: {r:?}"),
        Err(e) => e,
    }
}

#[test]
fn records_are_canonical_chained_and_hashed_as_documented() {
    let (_d, p) = log_with(3);
    let mut prev = ZERO_HASH.to_string();
    for (i, l) in lines(&p).iter().enumerate() {
        let v: Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["seq"], i as u64 + 1);
        assert_eq!(v["kind"], "connect");
        assert_eq!(v["host"], format!("h{}", i + 1));
        assert!(v["ts_ms"].as_u64().unwrap() > 1_600_000_000_000);
        assert_eq!(v["prev"], prev.as_str());
        // The documented rule, computed independently: the record without
        // `hash`, keys sorted, no whitespace, hashed with SHA-256.
        let mut m = v.as_object().unwrap().clone();
        let hash = m.remove("hash").unwrap();
        let mut keys: Vec<_> = m.keys().cloned().collect();
        keys.sort();
        let body = format!(
            "{{{}}}",
            keys.iter()
                .map(|k| format!("{}:{}", Value::from(k.as_str()), m[k]))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert!(l.starts_with(&body[..body.len() - 1]), "{l} vs {body}");
        let want = hex(ring::digest::digest(&ring::digest::SHA256, body.as_bytes()).as_ref());
        assert_eq!(hash, want.as_str());
        assert!(l.ends_with(&format!(",\"hash\":\"{want}\"}}")));
        prev = want;
    }
    let head: Value =
        serde_json::from_slice(&std::fs::read(with_suffix(&p, ".head")).unwrap()).unwrap();
    assert_eq!(head, json!({"seq": 3, "hash": prev}));
    let r = verify(&p).unwrap();
    assert_eq!(
        r,
        VerifyReport {
            records: 3,
            last_seq: 3,
            last_hash: prev
        }
    );
    let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn nested_objects_are_sorted_and_strings_escaped() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.jsonl");
    let log = AuditLog::open(&p).unwrap();
    log.append(
        "llm",
        json!({"z": {"b": 1, "a": [{"y": 2, "x": "é\n\"q\""}]}, "a": null, "m": 1.5}),
    )
    .unwrap();
    let l = &lines(&p)[0];
    assert!(
        l.starts_with(r#"{"a":null,"kind":"llm","m":1.5,"prev":""#),
        "{l}"
    );
    assert!(
        l.contains(r#""z":{"a":[{"x":"é\n\"q\"","y":2}],"b":1}"#),
        "{l}"
    );
    verify(&p).unwrap();
}

#[test]
fn the_chain_continues_across_reopen() {
    let (_d, p) = log_with(3);
    let log = AuditLog::open(&p).unwrap();
    assert_eq!(log.last().0, 3);
    assert_eq!(log.append("http", json!({"host": "x"})).unwrap(), 4);
    drop(log);
    let log = AuditLog::open(&p).unwrap();
    assert_eq!(log.append("http", json!({"host": "y"})).unwrap(), 5);
    let r = verify(&p).unwrap();
    assert_eq!((r.records, r.last_seq), (5, 5));
    assert_eq!(r.last_hash, log.last().1);
}

#[test]
fn an_empty_log_verifies_and_has_a_head() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("new").join("audit.jsonl");
    let log = AuditLog::open(&p).unwrap();
    assert_eq!(log.last(), (0, ZERO_HASH.to_string()));
    assert!(log.head_path().exists());
    let r = verify(&p).unwrap();
    assert_eq!(
        (r.records, r.last_seq, r.last_hash.as_str()),
        (0, 0, ZERO_HASH)
    );
    assert!(tail(&p, 5).unwrap().is_empty());
}

#[test]
fn a_torn_last_line_is_moved_aside_recorded_and_the_chain_continues() {
    let (d, p) = log_with(2);
    let torn = br#"{"host":"h3","kind":"connect","po"#;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&p)
        .unwrap()
        .write_all(torn)
        .unwrap();
    assert!(matches!(problem(&p).problem, Problem::TornTail));
    assert_eq!(problem(&p).line, Some(3));

    let log = AuditLog::open(&p).unwrap();
    let aside = log.torn_files();
    assert_eq!(aside.len(), 1);
    assert_eq!(std::fs::read(&aside[0]).unwrap(), torn);
    assert!(aside[0]
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("audit.jsonl.torn-"));
    assert_eq!(aside[0].parent().unwrap(), d.path().join("audit"));
    // The recovery is itself a record, then the chain goes on.
    let recs = tail(&p, 10).unwrap();
    assert_eq!(recs.len(), 3);
    assert_eq!(recs[2]["kind"], "audit-torn");
    assert_eq!(recs[2]["seq"], 3);
    assert_eq!(recs[2]["after_seq"], 2);
    assert_eq!(recs[2]["bytes"], torn.len());
    assert_eq!(recs[2]["moved_to"], aside[0].display().to_string());
    assert_eq!(log.append("connect", json!({"host": "h4"})).unwrap(), 4);
    assert_eq!(verify(&p).unwrap().records, 4);
}

#[test]
fn a_torn_line_left_by_another_writer_is_found_at_append() {
    let (_d, p) = log_with(1);
    let log = AuditLog::open(&p).unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&p)
        .unwrap()
        .write_all(b"{\"seq\":2")
        .unwrap();
    assert_eq!(
        log.append("dns", json!({})).unwrap(),
        3,
        "2 is the audit-torn record"
    );
    assert_eq!(log.torn_files().len(), 1);
    assert_eq!(verify(&p).unwrap().records, 3);
}

#[test]
fn a_changed_record_is_found_by_its_hash() {
    let (_d, p) = log_with(5);
    let mut ls = lines(&p);
    ls[2] = ls[2].replace("\"h3\"", "\"evil\"");
    write_lines(&p, &ls);
    let e = problem(&p);
    assert_eq!((e.line, e.seq), (Some(3), Some(3)), "{e}");
    assert!(matches!(e.problem, Problem::HashMismatch { .. }), "{e}");
    assert!(e.to_string().contains("line 3 (seq 3)"), "{e}");
    assert!(e.to_string().contains("changed"), "{e}");
}

#[test]
fn a_changed_record_with_a_recomputed_hash_breaks_the_next_link() {
    let (_d, p) = log_with(5);
    let mut ls = lines(&p);
    // Rewrite record 3 as a forger would: new content, a correct hash for it.
    let n = ls[2].len();
    let body = format!(
        "{}}}",
        &ls[2][..n - SUFFIX_LEN].replace("\"h3\"", "\"evil\"")
    );
    let h = hex(ring::digest::digest(&ring::digest::SHA256, body.as_bytes()).as_ref());
    ls[2] = format!("{},\"hash\":\"{h}\"}}", &body[..body.len() - 1]);
    write_lines(&p, &ls);
    let e = problem(&p);
    assert_eq!((e.line, e.seq), (Some(4), Some(4)), "{e}");
    assert!(matches!(e.problem, Problem::PrevMismatch { .. }), "{e}");
}

#[test]
fn a_deleted_middle_record_is_found() {
    let (_d, p) = log_with(5);
    let mut ls = lines(&p);
    ls.remove(2);
    write_lines(&p, &ls);
    let e = problem(&p);
    assert_eq!((e.line, e.seq), (Some(3), Some(4)), "{e}");
    assert!(
        matches!(
            e.problem,
            Problem::SeqGap {
                expected: 3,
                found: 4
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("record 3 was deleted"), "{e}");
    ls.remove(2);
    write_lines(&p, &ls);
    let e = problem(&p);
    assert_eq!((e.line, e.seq), (Some(3), Some(5)), "{e}");
    assert!(e.to_string().contains("records 3..4 were deleted"), "{e}");
}

#[test]
fn a_deleted_first_record_is_found() {
    let (_d, p) = log_with(3);
    let mut ls = lines(&p);
    ls.remove(0);
    write_lines(&p, &ls);
    let e = problem(&p);
    assert_eq!(e.line, Some(1));
    assert!(
        matches!(
            e.problem,
            Problem::SeqGap {
                expected: 1,
                found: 2
            }
        ),
        "{e}"
    );
}

#[test]
fn reordered_records_are_found() {
    let (_d, p) = log_with(5);
    let mut ls = lines(&p);
    ls.swap(1, 2);
    write_lines(&p, &ls);
    let e = problem(&p);
    assert_eq!((e.line, e.seq), (Some(2), Some(3)), "{e}");
    assert!(
        matches!(
            e.problem,
            Problem::SeqGap {
                expected: 2,
                found: 3
            }
        ),
        "{e}"
    );
}

#[test]
fn a_cut_tail_is_found_by_the_head_file_and_open_refuses_it() {
    let (_d, p) = log_with(5);
    let mut ls = lines(&p);
    ls.pop();
    write_lines(&p, &ls);
    let e = problem(&p);
    assert_eq!((e.line, e.seq), (Some(5), Some(5)), "{e}");
    assert!(
        matches!(
            e.problem,
            Problem::HeadAhead {
                head_seq: 5,
                last_seq: 4
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("cut from the end"), "{e}");
    let before = std::fs::read(&p).unwrap();
    match AuditLog::open(&p) {
        Err(AuditError::Broken { detail, .. }) => {
            assert!(detail.contains("cut from the end"), "{detail}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a log with its tail cut was continued"),
    }
    assert_eq!(std::fs::read(&p).unwrap(), before, "nothing appended");
}

#[test]
fn a_replaced_last_record_is_found_by_the_head_hash() {
    let (_d, p) = log_with(3);
    // Replace record 3 with a self-consistent forgery (right prev, right hash).
    let mut ls = lines(&p);
    let n = ls[2].len();
    let body = format!(
        "{}}}",
        &ls[2][..n - SUFFIX_LEN].replace("\"h3\"", "\"evil\"")
    );
    let h = hex(ring::digest::digest(&ring::digest::SHA256, body.as_bytes()).as_ref());
    ls[2] = format!("{},\"hash\":\"{h}\"}}", &body[..body.len() - 1]);
    write_lines(&p, &ls);
    let e = problem(&p);
    assert_eq!((e.line, e.seq), (Some(3), Some(3)), "{e}");
    assert!(matches!(e.problem, Problem::HeadHashMismatch { .. }), "{e}");
    assert!(matches!(AuditLog::open(&p), Err(AuditError::Broken { .. })));
}

#[test]
fn a_missing_head_file_is_found_and_open_refuses_it() {
    let (_d, p) = log_with(2);
    std::fs::remove_file(with_suffix(&p, ".head")).unwrap();
    let e = problem(&p);
    assert!(matches!(e.problem, Problem::HeadMissing), "{e}");
    assert!(matches!(AuditLog::open(&p), Err(AuditError::Broken { .. })));
}

#[test]
fn bad_json_is_found_with_its_line() {
    let (_d, p) = log_with(5);
    let mut ls = lines(&p);
    ls[3] = "not json".into();
    write_lines(&p, &ls);
    let e = problem(&p);
    assert_eq!((e.line, e.seq), (Some(4), None), "{e}");
    assert!(matches!(e.problem, Problem::BadJson(_)), "{e}");
    // A JSON line without the chain's members.
    ls[3] = r#"{"kind":"connect","host":"x"}"#.into();
    write_lines(&p, &ls);
    let e = problem(&p);
    assert_eq!(e.line, Some(4));
    assert!(matches!(e.problem, Problem::Malformed(_)), "{e}");
}

#[test]
fn open_refuses_a_changed_last_record() {
    let (_d, p) = log_with(2);
    let mut ls = lines(&p);
    ls[1] = ls[1].replace("\"h2\"", "\"h9\"");
    write_lines(&p, &ls);
    match AuditLog::open(&p) {
        Err(AuditError::Broken { detail, .. }) => {
            assert!(
                detail.contains("seq 2") && detail.contains("changed"),
                "{detail}"
            )
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("continued a chain whose last record was changed"),
    }
}

#[test]
fn reserved_names_and_non_objects_are_refused_and_nothing_is_written() {
    let (_d, p) = log_with(1);
    let log = AuditLog::open(&p).unwrap();
    let before = std::fs::read(&p).unwrap();
    for k in RESERVED {
        let mut m = Map::new();
        m.insert(k.to_string(), json!(1));
        match log.append("connect", Value::Object(m)) {
            Err(AuditError::Fields(msg)) => assert!(msg.contains(k), "{msg}"),
            other => panic!("{k}: {other:?}"),
        }
    }
    for v in [json!(null), json!([1]), json!("s"), json!(3)] {
        assert!(matches!(
            log.append("connect", v),
            Err(AuditError::Fields(_))
        ));
    }
    assert!(matches!(
        log.append("", json!({})),
        Err(AuditError::Fields(_))
    ));
    assert_eq!(std::fs::read(&p).unwrap(), before);
    assert_eq!(log.append("connect", json!({"hashes": 1})).unwrap(), 2);
}

#[test]
fn concurrent_appends_from_threads_and_handles_make_one_valid_chain() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("audit.jsonl");
    let shared = Arc::new(AuditLog::open(&p).unwrap());
    // A second handle on the same file stands for another process.
    let other = Arc::new(AuditLog::open(&p).unwrap());
    let mut threads = Vec::new();
    for t in 0..6 {
        let log = if t % 3 == 2 {
            other.clone()
        } else {
            shared.clone()
        };
        threads.push(std::thread::spawn(move || {
            (0..200)
                .map(|i| log.append("connect", json!({"t": t, "i": i})).unwrap())
                .collect::<Vec<_>>()
        }));
    }
    let mut seqs: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    seqs.sort();
    assert_eq!(seqs, (1..=1200).collect::<Vec<_>>());
    let r = verify(&p).unwrap();
    assert_eq!((r.records, r.last_seq), (1200, 1200));
}

#[test]
fn tail_reads_the_last_records_from_the_end() {
    // Enough records that the last few lie well past the first read chunk.
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("audit.jsonl");
    let log = AuditLog::open(&p).unwrap();
    let pad = "x".repeat(200);
    for i in 0..1500 {
        log.append("http", json!({"i": i, "pad": pad})).unwrap();
    }
    assert!(std::fs::metadata(&p).unwrap().len() > 4 * BACK_CHUNK);
    let last = tail(&p, 3).unwrap();
    let seqs: Vec<u64> = last.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1498, 1499, 1500]);
    // More than one chunk's worth of lines.
    let many = tail(&p, 700).unwrap();
    assert_eq!(many.len(), 700);
    assert_eq!(many[0]["seq"], 801);
    assert_eq!(many[699]["seq"], 1500);
    assert_eq!(tail(&p, 5000).unwrap().len(), 1500);
    // A torn last line is left out.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&p)
        .unwrap()
        .write_all(b"{\"seq\":15")
        .unwrap();
    assert_eq!(tail(&p, 1).unwrap()[0]["seq"], 1500);
}
