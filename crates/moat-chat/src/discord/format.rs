//! Answers for Discord. Discord renders Markdown itself, so the agent's
//! Markdown is kept, except what could notify someone or hide a link:
//! `@everyone`, `@here`, `<@user>`, `<@&role>`, `<#channel>` and
//! `</command:id>` are broken by an invisible zero-width space, and a
//! masked link `[text](url)` is shown as `text (<url>)` (its target in
//! view, no preview). Code blocks and spans are left as written: Discord
//! renders nothing inside them.
//!
//! This is defence in depth: every message moat sends also carries
//! `allowed_mentions = {"parse": []}` (`api.rs`), so even a mention that got
//! through would notify nobody.
//!
//! Must never: leave an agent's mass mention, user or role mention or masked
//! link live outside code. Pure functions.

/// Discord's limit is 2,000 characters a message; moat splits the Markdown
/// at 1,900, leaving room for the zero-width spaces formatting adds.
pub const DISCORD_CHUNK: usize = 1900;
/// Discord refuses a longer `content`.
pub const DISCORD_LIMIT: usize = 2000;

/// U+200B ZERO WIDTH SPACE: invisible, and breaks Discord's mention syntax.
const ZWSP: char = '\u{200B}';

/// One Markdown piece (from `crate::format::chunk`) made safe for Discord,
/// at most [`DISCORD_LIMIT`] characters.
pub fn to_discord(markdown: &str) -> String {
    cap(defused(markdown))
}

/// The piece with every mention and masked link outside code defused.
fn defused(markdown: &str) -> String {
    let mut out = String::with_capacity(markdown.len() + 16);
    let mut in_block = false;
    for (i, line) in markdown.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            out.push_str(line);
            continue;
        }
        if in_block {
            out.push_str(line);
        } else {
            inline(&mut out, line);
        }
    }
    out
}

/// `out` cut to [`DISCORD_LIMIT`] units.
fn cap(mut out: String) -> String {
    if units(&out) > DISCORD_LIMIT {
        // Only reachable by a piece `fit` could not split: cut, never refused.
        let mut cut = String::new();
        let mut n = 0;
        for c in out.chars() {
            if n + c.len_utf16() > DISCORD_LIMIT - 1 {
                break;
            }
            n += c.len_utf16();
            cut.push(c);
        }
        cut.push('…');
        out = cut;
    }
    out
}

/// Length as Discord may count it: UTF-16 code units (never fewer than
/// characters, so a piece within it is within either count).
pub fn units(s: &str) -> usize {
    s.encode_utf16().count()
}

/// One Markdown piece as Discord messages: [`to_discord`] of it, or, when
/// that is longer than Discord allows (emoji count twice in UTF-16, each
/// defused mention adds a character), of smaller pieces of it.
pub fn fit(markdown: &str) -> Vec<String> {
    let mut limit = DISCORD_CHUNK;
    loop {
        let pieces = if limit == DISCORD_CHUNK {
            vec![markdown.to_string()]
        } else {
            crate::format::chunk(markdown, limit)
        };
        let out: Vec<String> = pieces.iter().map(|p| defused(p)).collect();
        if limit <= 200 || out.iter().all(|m| units(m) <= DISCORD_LIMIT) {
            return out.into_iter().map(cap).collect();
        }
        limit /= 2;
    }
}

/// A line outside code blocks: code spans as they are, the rest defused.
fn inline(out: &mut String, line: &str) {
    let mut rest = line;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('`') {
            if let Some(end) = after.find('`') {
                out.push('`');
                out.push_str(&after[..=end]);
                rest = &after[end + 1..];
                continue;
            }
        }
        if rest.starts_with('[') {
            if let Some((text, url, used)) = link(rest) {
                defuse(out, text);
                out.push_str(" (<");
                out.push_str(url);
                out.push_str(">)");
                rest = &rest[used..];
                continue;
            }
        }
        let next = rest
            .char_indices()
            .skip(1)
            .find(|(_, c)| matches!(c, '`' | '['))
            .map(|(i, _)| i)
            .unwrap_or(rest.len());
        defuse(out, &rest[..next]);
        rest = &rest[next..];
    }
}

/// `s` with every mention form broken.
fn defuse(out: &mut String, s: &str) {
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        match (c, chars.peek()) {
            ('@', Some(_)) => out.push(ZWSP),
            ('<', Some('@' | '#' | '/')) => out.push(ZWSP),
            _ => {}
        }
    }
}

/// `[text](url)` at the start of `s`: text, url (without `<>`) and bytes
/// used.
fn link(s: &str) -> Option<(&str, &str, usize)> {
    let close = s.find("](")?;
    let text = &s[1..close];
    if text.contains('[') || text.contains('\n') {
        return None;
    }
    let after = &s[close + 2..];
    let end = after.find(')')?;
    let url = after[..end].trim_start_matches('<').trim_end_matches('>');
    if url.is_empty() || url.contains(char::is_whitespace) || url.contains(['<', '>']) {
        return None;
    }
    Some((text, url, close + 2 + end + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_and_code_are_kept() {
        assert_eq!(
            to_discord("**bold** and `a@b <@1>`\n```\n@everyone <@&2>\n```"),
            "**bold** and `a@b <@1>`\n```\n@everyone <@&2>\n```"
        );
        assert_eq!(to_discord("mail me: a@"), "mail me: a@");
    }

    /// P3: whatever the agent writes, outside code nothing is a live mass,
    /// user, role, channel or command mention, and no link hides its target.
    #[test]
    fn attack_p3_discord_answers_mention_nobody_and_show_link_targets() {
        let evil = "@everyone @here <@123> <@!123> <@&456> <#789> </ban:1> \
                    [✅ moat: done](https://evil.example/x) [ok](<https://evil.example/y>)";
        let out = to_discord(evil);
        for live in [
            "@everyone",
            "@here",
            "<@1",
            "<@!",
            "<@&",
            "<#7",
            "</b",
            "](",
        ] {
            assert!(!out.contains(live), "{live} live in {out}");
        }
        assert!(
            out.contains("✅ moat: done (<https://evil.example/x>)"),
            "{out}"
        );
        assert!(out.contains("ok (<https://evil.example/y>)"), "{out}");
        // Every piece stays within Discord's limit, even one all mentions.
        let flood = "@a ".repeat(700);
        assert!(units(&to_discord(&flood)) <= DISCORD_LIMIT);
    }

    proptest::proptest! {
        /// Any text without code: no live mention or masked link, and every
        /// message within Discord's limit.
        #[test]
        fn no_text_outside_code_can_mention(
            s in "([@<>#/&!\\[\\]()a-z0-9 \n:.😀]|everyone|here|https://x){0,400}"
        ) {
            let s = s.replace('`', "");
            for m in fit(&s) {
                proptest::prop_assert!(units(&m) <= DISCORD_LIMIT);
                for live in ["@everyone", "@here", "<@", "<#", "</"] {
                    proptest::prop_assert!(!m.contains(live), "{} in {:?}", live, m);
                }
                let masked = m
                    .char_indices()
                    .any(|(i, c)| c == '[' && link(&m[i..]).is_some());
                proptest::prop_assert!(!masked, "a masked link in {:?}", m);
            }
        }
    }

    #[test]
    fn pieces_of_emoji_or_mentions_are_split_not_cut() {
        for piece in ["😀".repeat(1900), "@a ".repeat(633)] {
            let msgs = fit(&piece);
            assert!(msgs.len() >= 2, "{}", msgs.len());
            assert!(msgs.iter().all(|m| units(m) <= DISCORD_LIMIT));
            let kept: String = msgs
                .concat()
                .chars()
                .filter(|c| *c != ZWSP && !c.is_whitespace())
                .collect();
            let want: String = piece.chars().filter(|c| !c.is_whitespace()).collect();
            assert_eq!(kept, want);
        }
        assert_eq!(fit("plain"), vec!["plain".to_string()]);
    }
}
