//! Nodesets: one string that names many hosts, in ClusterShell's syntax.
//!
//! `n[01-03,07]-[a-b]` is `n01-a n01-b n02-a n02-b n03-a n03-b n07-a n07-b`:
//! - a bracket group holds a comma list of numbers and ranges (`lo-hi`, optionally `/step`);
//!   a range is zero-padded to the width of its lower bound (`[08-11]` is 08 09 10 11);
//! - several groups form a cartesian product, the first group varying slowest;
//! - commas outside brackets join nodesets (`a,b,n[1-2]`);
//! - beyond ClusterShell, a group may hold single letters and letter ranges (`[a-c]`).
//!
//! Names come out in the order written, neither sorted nor deduplicated: the topology's own
//! duplicate check reports repeats where the user wrote them. A string containing `:` is an
//! IPv6 address and is taken literally (`[` and `]` are refused there, see [`expand`]).
//!
//! The `nodeset` crate (nodeset-rs) implements the full ClusterShell library, but as a set
//! (sorted, folded), without letter ranges and with a CLI's dependencies (clap, env_logger,
//! serde_yaml) in its library; this is the small part arbor needs.

/// The most names one nodeset may expand to, so a typo like `[1-10000000]` fails fast.
pub const MAX_NAMES: usize = 65_536;

/// What is wrong with a nodeset, and where: `at` counts characters from the start (0-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct NodesetError {
    pub at: usize,
    pub message: String,
}

fn error<T>(at: usize, message: impl Into<String>) -> Result<T, NodesetError> {
    Err(NodesetError {
        at,
        message: message.into(),
    })
}

/// Expands `set` into the names it stands for, in order.
pub fn expand(set: &str) -> Result<Vec<String>, NodesetError> {
    if set.contains(':') {
        if let Some(at) = set.find(['[', ']']) {
            return error(
                set[..at].chars().count(),
                "an IPv6 address is written without brackets and cannot be a nodeset",
            );
        }
        return Ok(vec![set.to_string()]);
    }
    let chars: Vec<char> = set.chars().collect();
    let mut names = Vec::new();
    for (from, to) in split_outside_brackets(&chars)? {
        if from == to {
            return error(
                from,
                "empty name in the list (two commas, or one at an end)",
            );
        }
        names.extend(expand_pattern(&chars[from..to], from, names.len())?);
    }
    Ok(names)
}

/// Splits at commas that are not inside brackets; checks brackets pair up without nesting.
fn split_outside_brackets(chars: &[char]) -> Result<Vec<(usize, usize)>, NodesetError> {
    let mut parts = Vec::new();
    let mut open: Option<usize> = None;
    let mut from = 0;
    for (i, &c) in chars.iter().enumerate() {
        match (c, open) {
            ('[', Some(_)) => return error(i, "`[` inside brackets (groups do not nest)"),
            ('[', None) => open = Some(i),
            (']', None) => return error(i, "`]` without a matching `[`"),
            (']', Some(_)) => open = None,
            (',', None) => {
                parts.push((from, i));
                from = i + 1;
            }
            (c, _) if c.is_whitespace() => return error(i, "whitespace in a nodeset"),
            _ => {}
        }
    }
    if let Some(at) = open {
        return error(at, "unclosed `[`");
    }
    parts.push((from, chars.len()));
    Ok(parts)
}

/// One comma-free pattern: literal text and bracket groups. `offset` places errors in the
/// whole string; `already` is how many names came before, for the size limit.
fn expand_pattern(
    chars: &[char],
    offset: usize,
    already: usize,
) -> Result<Vec<String>, NodesetError> {
    let mut names = vec![String::new()];
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '[' {
            let close = chars[i..]
                .iter()
                .position(|&c| c == ']')
                .map(|p| i + p)
                .ok_or(NodesetError {
                    at: offset + i,
                    message: "unclosed `[`".into(),
                })?;
            let group = expand_group(&chars[i + 1..close], offset + i + 1)?;
            if already + names.len() * group.len() > MAX_NAMES {
                return error(
                    offset + i,
                    format!("expands to more than {MAX_NAMES} names"),
                );
            }
            names = names
                .iter()
                .flat_map(|prefix| group.iter().map(move |g| format!("{prefix}{g}")))
                .collect();
            i = close + 1;
        } else {
            let end = chars[i..]
                .iter()
                .position(|&c| c == '[')
                .map_or(chars.len(), |p| i + p);
            let text: String = chars[i..end].iter().collect();
            for name in &mut names {
                name.push_str(&text);
            }
            i = end;
        }
    }
    Ok(names)
}

/// The inside of one bracket group: `01-03,07`, `a-c`, `1-9/2`.
fn expand_group(chars: &[char], offset: usize) -> Result<Vec<String>, NodesetError> {
    if chars.is_empty() {
        return error(offset.saturating_sub(1), "empty brackets `[]`");
    }
    let mut out = Vec::new();
    let mut from = 0;
    for end in chars
        .iter()
        .enumerate()
        .filter(|(_, c)| **c == ',')
        .map(|(i, _)| i)
        .chain([chars.len()])
    {
        let item: String = chars[from..end].iter().collect();
        if item.is_empty() {
            return error(offset + from, "empty item in brackets");
        }
        out.extend(expand_item(&item, offset + from)?);
        if out.len() > MAX_NAMES {
            return error(
                offset + from,
                format!("expands to more than {MAX_NAMES} names"),
            );
        }
        from = end + 1;
    }
    Ok(out)
}

/// One item of a group: `7`, `01-03`, `1-9/2`, `a`, `a-c`.
fn expand_item(item: &str, at: usize) -> Result<Vec<String>, NodesetError> {
    let (range, step) = match item.split_once('/') {
        None => (item, 1),
        Some((range, step)) => {
            let step_at = at + range.chars().count() + 1;
            if !range.contains('-') {
                return error(step_at, "a step (`/N`) needs a range before it");
            }
            match number(step, step_at)? {
                0 => return error(step_at, "a step must be at least 1"),
                n => (range, n),
            }
        }
    };
    let (lo, hi) = match range.split_once('-') {
        None => (range, None),
        Some((lo, hi)) => (lo, Some(hi)),
    };
    let hi_at = at + lo.chars().count() + 1;
    if lo.is_empty() {
        return error(at, format!("`{item}` has no lower bound"));
    }
    if hi == Some("") {
        return error(hi_at, format!("`{item}` has no upper bound"));
    }
    let letter = |s: &str| {
        let mut cs = s.chars();
        match (cs.next(), cs.next()) {
            (Some(c), None) if c.is_ascii_alphabetic() => Some(c),
            _ => None,
        }
    };
    if lo.chars().all(|c| c.is_ascii_digit()) {
        let first = number(lo, at)?;
        let Some(hi) = hi else {
            return Ok(vec![lo.to_string()]);
        };
        if !hi.chars().all(|c| c.is_ascii_digit()) {
            return error(hi_at, format!("`{item}` mixes a number and a letter"));
        }
        let last = number(hi, hi_at)?;
        if last < first {
            return error(at, format!("reversed range `{lo}-{hi}`"));
        }
        let count = (last - first) / step + 1;
        if count > MAX_NAMES as u64 {
            return error(at, format!("expands to more than {MAX_NAMES} names"));
        }
        let width = lo.len();
        Ok((0..count)
            .map(|k| format!("{:0width$}", first + k * step))
            .collect())
    } else if let Some(first) = letter(lo) {
        let Some(hi) = hi else {
            return Ok(vec![first.to_string()]);
        };
        let Some(last) = letter(hi) else {
            return error(
                hi_at,
                format!("`{item}`: a letter range runs from one letter to another, like `a-f`"),
            );
        };
        if first.is_ascii_lowercase() != last.is_ascii_lowercase() {
            return error(at, format!("letter range `{item}` mixes cases"));
        }
        if last < first {
            return error(at, format!("reversed range `{lo}-{hi}`"));
        }
        Ok((first..=last)
            .step_by(step as usize)
            .map(|c| c.to_string())
            .collect())
    } else {
        error(
            at,
            format!("`{item}` is not a number, a letter, or a range of either"),
        )
    }
}

fn number(s: &str, at: usize) -> Result<u64, NodesetError> {
    if s.is_empty() || !s.chars().all(|c| c.is_ascii_digit()) {
        return error(at, format!("`{s}` is not a number"));
    }
    if s.len() > 18 {
        return error(at, format!("`{s}` is too large"));
    }
    s.parse().map_err(|_| NodesetError {
        at,
        message: format!("`{s}` is not a number"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(set: &str) -> Vec<String> {
        match expand(set) {
            Ok(names) => names,
            Err(e) => panic!("{set:?}: {e} at {}", e.at),
        }
    }

    fn fails(set: &str, at: usize, message: &str) {
        match expand(set) {
            Ok(names) => panic!("{set:?} expanded to {names:?}, expected an error"),
            Err(e) => {
                assert_eq!((e.at, e.message.as_str()), (at, message), "for {set:?}");
            }
        }
    }

    #[test]
    fn a_plain_name_is_itself() {
        assert_eq!(names("jump1.dc1"), ["jump1.dc1"]);
    }

    #[test]
    fn a_range_keeps_the_lower_bounds_zero_padding() {
        assert_eq!(names("n[01-03]"), ["n01", "n02", "n03"]);
        assert_eq!(names("n[8-11]"), ["n8", "n9", "n10", "n11"]);
        assert_eq!(names("n[008-010]"), ["n008", "n009", "n010"]);
        assert_eq!(names("n[98-100]"), ["n98", "n99", "n100"]);
        assert_eq!(names("n[07]"), ["n07"]);
    }

    #[test]
    fn a_list_in_brackets_mixes_numbers_and_ranges_in_order() {
        assert_eq!(names("n[01-03,07]"), ["n01", "n02", "n03", "n07"]);
        assert_eq!(names("n[5,1-2]"), ["n5", "n1", "n2"]);
    }

    #[test]
    fn a_step_skips() {
        assert_eq!(names("n[1-9/3]"), ["n1", "n4", "n7"]);
        assert_eq!(names("n[a-e/2]"), ["na", "nc", "ne"]);
    }

    #[test]
    fn several_groups_form_a_product_first_group_slowest() {
        assert_eq!(
            names("n[01-03,07]-[a-b]"),
            [
                "n01-a", "n01-b", "n02-a", "n02-b", "n03-a", "n03-b", "n07-a", "n07-b"
            ]
        );
        assert_eq!(
            names("r[1-2]n[1-2].x"),
            ["r1n1.x", "r1n2.x", "r2n1.x", "r2n2.x"]
        );
    }

    #[test]
    fn an_ip_address_range_expands() {
        let hosts = names("10.1.0.[11-40]");
        assert_eq!(hosts.len(), 30);
        assert_eq!(hosts[0], "10.1.0.11");
        assert_eq!(hosts[29], "10.1.0.40");
        assert_eq!(names("10.199.[1-2].1[1-3]").len(), 6);
    }

    #[test]
    fn commas_outside_brackets_join_nodesets() {
        assert_eq!(names("a,b,n[1-2]"), ["a", "b", "n1", "n2"]);
    }

    #[test]
    fn an_ipv6_address_is_taken_literally() {
        assert_eq!(names("fd00:199::11"), ["fd00:199::11"]);
        assert_eq!(names("::1"), ["::1"]);
    }

    #[test]
    fn repeats_are_kept_for_the_duplicate_check() {
        assert_eq!(names("n[1,1]"), ["n1", "n1"]);
    }

    #[test]
    fn letter_ranges_are_single_letters_of_one_case() {
        assert_eq!(names("x[a-c]"), ["xa", "xb", "xc"]);
        assert_eq!(names("x[A-B,z]"), ["xA", "xB", "xz"]);
    }

    #[test]
    fn bad_nodesets_say_what_is_wrong_and_where() {
        fails("n[1-3", 1, "unclosed `[`");
        fails("n1-3]", 4, "`]` without a matching `[`");
        fails("n[1-[2]]", 4, "`[` inside brackets (groups do not nest)");
        fails("n[5-3]", 2, "reversed range `5-3`");
        fails("n[c-a]", 2, "reversed range `c-a`");
        fails("n[]", 1, "empty brackets `[]`");
        fails("n[1,,2]", 4, "empty item in brackets");
        fails("n[1-]", 4, "`1-` has no upper bound");
        fails("n[-3]", 2, "`-3` has no lower bound");
        fails("n[1-c]", 4, "`1-c` mixes a number and a letter");
        fails("n[a-C]", 2, "letter range `a-C` mixes cases");
        fails(
            "n[ab-cd]",
            2,
            "`ab-cd` is not a number, a letter, or a range of either",
        );
        fails(
            "n[a-cd]",
            4,
            "`a-cd`: a letter range runs from one letter to another, like `a-f`",
        );
        fails("n[1-9/0]", 6, "a step must be at least 1");
        fails("n[1-9/x]", 6, "`x` is not a number");
        fails("n[3/2]", 4, "a step (`/N`) needs a range before it");
        fails(
            "a,,b",
            2,
            "empty name in the list (two commas, or one at an end)",
        );
        fails(
            "a,",
            2,
            "empty name in the list (two commas, or one at an end)",
        );
        fails("a b", 1, "whitespace in a nodeset");
        fails(
            "[fd00::1]",
            0,
            "an IPv6 address is written without brackets and cannot be a nodeset",
        );
        fails("n[1-1000000]", 2, "expands to more than 65536 names");
        fails("n[1-300][1-300]", 8, "expands to more than 65536 names");
        fails(
            "n[1234567890123456789]",
            2,
            "`1234567890123456789` is too large",
        );
    }
}
