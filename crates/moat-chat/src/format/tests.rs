use super::*;
use proptest::prelude::*;

#[test]
fn emphasis_and_strike() {
    assert_eq!(to_mrkdwn("**bold** and __bold__"), "*bold* and *bold*");
    assert_eq!(to_mrkdwn("*it* and _it_"), "_it_ and _it_");
    assert_eq!(to_mrkdwn("***both***"), "*_both_*");
    assert_eq!(to_mrkdwn("~~gone~~ ~one~"), "~gone~ ~one~");
    assert_eq!(to_mrkdwn("*a **b** c*"), "_a *b* c_");
    // Not emphasis: intraword underscores, spaced stars, lone markers.
    assert_eq!(
        to_mrkdwn("snake_case_name and 2 * 3 * 4"),
        "snake_case_name and 2 * 3 * 4"
    );
    assert_eq!(to_mrkdwn("a ** b"), "a ** b");
    assert_eq!(to_mrkdwn(r"\*not italic\*"), "*not italic*");
}

#[test]
fn links_and_images() {
    assert_eq!(
        to_mrkdwn("see [the docs](https://example.com/a?b=1&c=2) now"),
        "see <https://example.com/a?b=1&amp;c=2|the docs> now"
    );
    assert_eq!(
        to_mrkdwn("[**bold** `x`](https://e.com/p \"title\")"),
        "<https://e.com/p|bold x>"
    );
    assert_eq!(
        to_mrkdwn("![chart](https://e.com/c.png)"),
        "<https://e.com/c.png|chart>"
    );
    assert_eq!(to_mrkdwn("<https://e.com/x>"), "<https://e.com/x>");
    // Not a web link: the label, and the target in brackets, escaped.
    assert_eq!(
        to_mrkdwn("[run](javascript:alert<1>)"),
        "run (javascript:alert&lt;1&gt;)"
    );
    assert_eq!(to_mrkdwn("[file](src/main.rs)"), "file (src/main.rs)");
    // A `|` in a URL cannot end the URL early.
    assert_eq!(
        to_mrkdwn("[x](https://e.com/a|b)"),
        "<https://e.com/a%7Cb|x>"
    );
    assert_eq!(to_mrkdwn("[not a link] (x)"), "[not a link] (x)");
}

#[test]
fn escaping_everywhere_even_in_code() {
    assert_eq!(to_mrkdwn("a < b && c > d"), "a &lt; b &amp;&amp; c &gt; d");
    // Slack control sequences written by an agent stay inert.
    assert_eq!(
        to_mrkdwn("<!channel> hi <@U123>"),
        "&lt;!channel&gt; hi &lt;@U123&gt;"
    );
    assert_eq!(to_mrkdwn("`a<b>&c`"), "`a&lt;b&gt;&amp;c`");
    assert_eq!(
        to_mrkdwn("```rust\nif a < b { **not bold** }\n```"),
        "```\nif a &lt; b { **not bold** }\n```"
    );
}

#[test]
fn block_structure() {
    let md = "# Title\n\n## Sub **x**\n\nText.\n\n- one\n* two\n  - nested\n- [ ] todo\n- [x] done\n1. first\n2) second\n> quoted *it*\n\n---\n\n~~~\nraw *text*\n~~~";
    let want = "*Title*\n\n*Sub x*\n\nText.\n\n• one\n• two\n  • nested\n☐ todo\n☑ done\n1. first\n2. second\n> _quoted_ _it_\n\n──────────\n\n```\nraw *text*\n```";
    // The quote line: `> ` then inline of "quoted *it*".
    let want = want.replace("> _quoted_ _it_", "> quoted _it_");
    assert_eq!(to_mrkdwn(md), want);
    // An unclosed block is closed.
    assert_eq!(to_mrkdwn("```\ncode"), "```\ncode\n```");
    // A heading needs a space; `#hashtag` is text.
    assert_eq!(to_mrkdwn("#hashtag"), "#hashtag");
}

#[test]
fn tables_become_code_blocks() {
    let md = "Results:\n| name | ms |\n|------|---:|\n| a<b  | 3  |\nafter";
    assert_eq!(
        to_mrkdwn(md),
        "Results:\n```\n| name | ms |\n|------|---:|\n| a&lt;b  | 3  |\n```\nafter"
    );
}

fn lens(chunks: &[String]) -> Vec<usize> {
    chunks.iter().map(|c| c.chars().count()).collect()
}

#[test]
fn short_text_is_one_chunk() {
    assert_eq!(chunk("hello", 3900), vec!["hello"]);
    assert_eq!(chunk("  \n\nhello\n\n", 3900), vec!["hello"]);
    assert!(chunk("", 10).is_empty());
    assert!(chunk(" \n ", 10).is_empty());
}

#[test]
fn splits_at_paragraph_then_line_then_word() {
    let p1 = "a".repeat(40);
    let p2 = "b ".repeat(30);
    let text = format!("{p1}\nline two\n\n{p2}");
    let c = chunk(&text, 60);
    assert_eq!(c[0], format!("{p1}\nline two"), "paragraph first");
    // No paragraph break in reach: a line break.
    let text = format!("{}\n{}", "x".repeat(50), "y".repeat(50));
    assert_eq!(chunk(&text, 60), vec!["x".repeat(50), "y".repeat(50)]);
    // No line break: a word break.
    let text = "word ".repeat(30);
    let c = chunk(&text, 23);
    assert!(c.iter().all(|p| p.split(' ').all(|w| w == "word")), "{c:?}");
    assert!(lens(&c).iter().all(|&n| n <= 23));
    // A word longer than the limit is cut.
    let c = chunk(&"z".repeat(25), 10);
    assert_eq!(c, vec!["z".repeat(10), "z".repeat(10), "z".repeat(5)]);
}

#[test]
fn never_splits_a_character() {
    let text = "é🦀ü".repeat(20);
    let c = chunk(&text, 7);
    assert!(lens(&c).iter().all(|&n| n <= 7));
    assert_eq!(c.concat(), text);
}

#[test]
fn code_blocks_move_whole_when_they_fit() {
    let code = format!("```\n{}\n```", ["let x = 1;"; 8].join("\n"));
    let text = format!("{}\n\n{code}\n\nend", "intro ".repeat(5).trim_end());
    let c = chunk(&text, 100);
    assert_eq!(c[0], "intro ".repeat(5).trim_end());
    assert_eq!(c[1], format!("{code}\n\nend"));
    assert_eq!(c.len(), 2);
}

#[test]
fn long_code_blocks_are_closed_and_reopened() {
    let body: Vec<String> = (0..40).map(|i| format!("    line {i:02};")).collect();
    let text = format!("Here:\n```\n{}\n```\nDone.", body.join("\n"));
    let c = chunk(&text, 120);
    assert!(c.len() > 3, "{c:?}");
    for p in &c {
        assert!(p.chars().count() <= 120, "{p:?}");
        let fences = p
            .lines()
            .filter(|l| l.trim_start().starts_with("```"))
            .count();
        assert_eq!(fences % 2, 0, "every piece is balanced: {p:?}");
    }
    // Every code line survives whole, indentation included, in order.
    let joined = c.join("\n");
    let found: Vec<&str> = joined.lines().filter(|l| l.contains("line ")).collect();
    assert_eq!(found, body.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(c.last().unwrap().ends_with("Done."));
}

/// Pieces are consecutive pieces of the original, whitespace at the splits aside.
fn rejoins(text: &str, chunks: &[String]) -> Result<(), String> {
    let mut rest = text;
    for c in chunks {
        let c = c.trim_start();
        rest = rest.trim_start();
        if !rest.starts_with(c) {
            return Err(format!("piece {c:?} is not next in {rest:?}"));
        }
        rest = &rest[c.len()..];
    }
    if rest.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("left over: {rest:?}"))
    }
}

fn no_space(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn chunks_rejoin_and_fit(
        text in "([a-zé🦀]{1,12}( |\n|\n\n|  \n \n)){0,80}[a-z]{0,30}",
        limit in 1usize..120,
    ) {
        let c = chunk(&text, limit);
        for p in &c {
            prop_assert!(p.chars().count() <= limit, "{p:?} > {limit}");
            prop_assert!(!p.trim().is_empty());
            prop_assert_eq!(p.trim_end(), p.as_str());
        }
        if let Err(e) = rejoins(&text, &c) {
            return Err(TestCaseError::fail(e));
        }
    }

    #[test]
    fn chunks_with_code_fit_and_keep_everything(
        text in "((```|[a-z]{1,10}|    [a-z]{1,6})(\n|\n\n| )){0,60}",
        limit in 1usize..150,
    ) {
        let c = chunk(&text, limit);
        for p in &c {
            prop_assert!(p.chars().count() <= limit, "{p:?} > {limit}");
        }
        // Nothing lost or invented but fences and whitespace.
        prop_assert_eq!(
            no_space(&c.concat()).replace("```", ""),
            no_space(&text).replace("```", "")
        );
    }

    #[test]
    fn mrkdwn_never_panics_and_leaves_no_raw_angle_brackets(
        text in prop_oneof![
            "\\PC{0,200}",
            "(\\[|\\]|\\(|\\)|!|<|>|&|\\*|_|~|`|\\||\\\\|https://|mailto:|javascript:|#|- |[a-z é]|\n){0,120}",
        ],
    ) {
        let m = to_mrkdwn(&text);
        // Every `<` opens a link we made.
        for (i, _) in m.match_indices('<') {
            let rest = m[i + 1..].to_ascii_lowercase();
            prop_assert!(
                rest.starts_with("http://") || rest.starts_with("https://") || rest.starts_with("mailto:"),
                "{m:?}"
            );
        }
    }
}
