//! Answers for Telegram: the agent's Markdown as Telegram HTML
//! (`parse_mode = "HTML"`), which needs only `&`, `<` and `>` escaped.
//!
//! Code blocks become `<pre>`, code spans `<code>`, `**bold**` `<b>`;
//! everything else is escaped text. A Markdown link `[text](url)` is shown as
//! `text (url)`, never as a live link with hidden target, and an `@name` is
//! broken with a word joiner so it cannot notify anyone.
//!
//! Must never: emit a tag other than `<pre>`, `<code>` and `<b>` (balanced),
//! or leave an agent's `@mention` or hidden link live. Pure functions.

/// Telegram's limit is 4,096 characters of text a message (counted after
/// the HTML is parsed); moat splits the Markdown at 3,900.
pub const TELEGRAM_CHUNK: usize = 3900;

/// U+2060 WORD JOINER: invisible, and breaks Telegram's mention detection.
const JOINER: char = '\u{2060}';

/// `s` escaped for Telegram HTML, mentions broken.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    escape_into(&mut out, s);
    out
}

fn escape_into(out: &mut String, s: &str) {
    let mut prev: Option<char> = None;
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '@' => {
                out.push('@');
                out.push(JOINER);
            }
            // `/cmd@bot` and `#tag` are links in Telegram too: broken alike
            // where they start a word.
            '/' | '#' if prev.is_none_or(|p| p.is_whitespace()) => {
                out.push(c);
                out.push(JOINER);
            }
            c => out.push(c),
        }
        prev = Some(c);
    }
}

/// One Markdown piece (from `crate::format::chunk`) as Telegram HTML.
pub fn to_html(markdown: &str) -> String {
    let mut out = String::new();
    let mut in_code = false;
    let mut code = String::new();
    for line in markdown.split('\n') {
        if line.trim_start().starts_with("```") {
            if in_code {
                out.push_str("<pre>");
                escape_code(&mut out, code.trim_end_matches('\n'));
                out.push_str("</pre>\n");
                code.clear();
            }
            in_code = !in_code;
            continue;
        }
        if in_code {
            code.push_str(line);
            code.push('\n');
        } else {
            inline(&mut out, line);
            out.push('\n');
        }
    }
    if in_code {
        // An unclosed block: still code, still escaped.
        out.push_str("<pre>");
        escape_code(&mut out, code.trim_end_matches('\n'));
        out.push_str("</pre>\n");
    }
    out.trim_end().to_string()
}

/// Code is shown as written: only the three HTML characters are escaped
/// (mentions inside `<pre>`/`<code>` are not detected by Telegram).
fn escape_code(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
}

/// One line outside code: code spans, bold, links, headings.
fn inline(out: &mut String, line: &str) {
    let line = match line.trim_start().strip_prefix('#') {
        Some(_) => line.trim_start().trim_start_matches('#').trim_start(),
        None => line,
    };
    let mut rest = line;
    let mut bold = false;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('`') {
            if let Some(end) = after.find('`') {
                out.push_str("<code>");
                escape_code(out, &after[..end]);
                out.push_str("</code>");
                rest = &after[end + 1..];
                continue;
            }
        }
        if let Some(after) = rest.strip_prefix("**") {
            out.push_str(if bold { "</b>" } else { "<b>" });
            bold = !bold;
            rest = after;
            continue;
        }
        if rest.starts_with('[') {
            if let Some((text, url, used)) = link(rest) {
                escape_into(out, text);
                out.push_str(" (");
                escape_code(out, url);
                out.push(')');
                rest = &rest[used..];
                continue;
            }
        }
        let next = rest
            .char_indices()
            .skip(1)
            .find(|(_, c)| matches!(c, '`' | '*' | '['))
            .map(|(i, _)| i)
            .unwrap_or(rest.len());
        escape_into(out, &rest[..next]);
        rest = &rest[next..];
    }
    if bold {
        out.push_str("</b>");
    }
}

/// `[text](url)` at the start of `s`: text, url and bytes used.
fn link(s: &str) -> Option<(&str, &str, usize)> {
    let close = s.find("](")?;
    let text = &s[1..close];
    if text.contains('[') || text.contains('\n') {
        return None;
    }
    let after = &s[close + 2..];
    let end = after.find(')')?;
    let url = &after[..end];
    if url.is_empty() || url.contains(char::is_whitespace) {
        return None;
    }
    Some((text, url, close + 2 + end + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_becomes_balanced_html() {
        assert_eq!(
            to_html("# Title\n**bold** and `a<b`\n```rust\nif a < b && c {}\n```"),
            "Title\n<b>bold</b> and <code>a&lt;b</code>\n<pre>if a &lt; b &amp;&amp; c {}</pre>"
        );
        assert_eq!(to_html("**open"), "<b>open</b>");
        assert_eq!(
            to_html("```\nunclosed <x>"),
            "<pre>unclosed &lt;x&gt;</pre>"
        );
    }

    /// P3: whatever the agent writes, the HTML has only moat's own tags, no
    /// live mention and no link whose target is hidden.
    #[test]
    fn attack_p3_telegram_answers_carry_no_live_mention_or_hidden_link() {
        let evil = "<a href=\"https://evil.example\">✅ moat: done</a> @everyone @admin \
                    [✅ done](https://evil.example/x) <b>x</b> &lt; /start@bot #tag";
        let html = to_html(evil);
        assert!(!html.contains("<a"), "{html}");
        // The only tags are the ones moat writes.
        let tags: Vec<&str> = html.match_indices('<').map(|(i, _)| &html[i..]).collect();
        assert!(tags.is_empty(), "{html}");
        for m in ["@everyone", "@admin", "/start", "#tag"] {
            assert!(!html.contains(m), "{m} live in {html}");
        }
        // The link's target is shown next to its text.
        assert!(html.contains("✅ done (https://evil.example/x)"), "{html}");
        assert!(html.contains("&amp;lt;"), "{html}");
    }
}
