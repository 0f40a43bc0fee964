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
//! [`fold`] goes the other way, as ClusterShell's `nodeset -f` does: a set of names becomes the
//! shortest nodeset this module writes (`n1 n2 n3 n7` → `n[1-3,7]`), folding every numeric
//! position (`l1-1 l1-2 l2-1 l2-2` → `l[1-2]-[1-2]`), keeping zero padding apart (`n9 n09`
//! stay two items), and expanding back to exactly the names it was given.
//!
//! The `nodeset` crate (nodeset-rs) implements the full ClusterShell library, but as a set
//! (sorted, folded), without letter ranges and with a CLI's dependencies (clap, env_logger,
//! serde_yaml) in its library; this is the small part arbor needs.

/// The most names one nodeset may expand to, so a typo like `[1-10000000]` fails fast.
pub const MAX_NAMES: usize = 65_536;

/// The most bytes of names one pattern may expand to (names × their length), so that a few
/// long names times many groups cannot take seconds and gigabytes either.
pub const MAX_BYTES: usize = 8 << 20;

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

/// Expands `set` into the names it stands for, in order. An item of the comma list that
/// holds a `:` is an IPv6 address, taken as it is.
pub fn expand(set: &str) -> Result<Vec<String>, NodesetError> {
    let chars: Vec<char> = set.chars().collect();
    if set.contains(':')
        && let Some(at) = chars.iter().position(|c| matches!(c, '[' | ']'))
    {
        let part_start = chars[..at]
            .iter()
            .rposition(|c| *c == ',')
            .map_or(0, |i| i + 1);
        let part_end = chars[at..]
            .iter()
            .position(|c| *c == ',')
            .map_or(chars.len(), |i| at + i);
        if chars[part_start..part_end].contains(&':') {
            return error(
                at,
                "an IPv6 address is written without brackets and cannot be a nodeset",
            );
        }
    }
    let mut names = Vec::new();
    for (from, to) in split_outside_brackets(&chars)? {
        if from == to {
            return error(
                from,
                "empty name in the list (two commas, or one at an end)",
            );
        }
        let part = &chars[from..to];
        if part.contains(&':') {
            // An IPv6 address: taken as it is.
            names.push(part.iter().collect());
            if names.len() > MAX_NAMES {
                return error(from, format!("expands to more than {MAX_NAMES} names"));
            }
            continue;
        }
        names.extend(expand_pattern(part, from, names.len())?);
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
/// whole string; `already` is how many names came before, for the size limit. The groups are
/// expanded first and the limits checked (names, and bytes, so long names cannot make a
/// small count huge); then each name is built once.
fn expand_pattern(
    chars: &[char],
    offset: usize,
    already: usize,
) -> Result<Vec<String>, NodesetError> {
    let mut segments: Vec<Vec<String>> = Vec::new();
    let (mut count, mut longest) = (1usize, 0usize);
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
            count = count.saturating_mul(group.len());
            longest += group.iter().map(String::len).max().unwrap_or(0);
            if already.saturating_add(count) > MAX_NAMES {
                return error(
                    offset + i,
                    format!("expands to more than {MAX_NAMES} names"),
                );
            }
            if count.saturating_mul(longest) > MAX_BYTES {
                return error(
                    offset + i,
                    format!("expands to more than {} MiB of names", MAX_BYTES >> 20),
                );
            }
            segments.push(group);
            i = close + 1;
        } else {
            let end = chars[i..]
                .iter()
                .position(|&c| c == '[')
                .map_or(chars.len(), |p| i + p);
            let text: String = chars[i..end].iter().collect();
            longest += text.len();
            if count.saturating_mul(longest) > MAX_BYTES {
                return error(
                    offset + i,
                    format!("expands to more than {} MiB of names", MAX_BYTES >> 20),
                );
            }
            segments.push(vec![text]);
            i = end;
        }
    }
    // An odometer over the segments, the last one turning fastest.
    let mut names = Vec::with_capacity(count);
    let mut at = vec![0usize; segments.len()];
    loop {
        let mut name = String::new();
        for (segment, &k) in segments.iter().zip(&at) {
            name.push_str(&segment[k]);
        }
        names.push(name);
        let mut d = segments.len();
        loop {
            if d == 0 {
                return Ok(names);
            }
            d -= 1;
            at[d] += 1;
            if at[d] < segments[d].len() {
                break;
            }
            at[d] = 0;
        }
    }
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

/// One part of a name while folding: literal text, a number as written, or the numbers
/// (value, as written) already folded into this position.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Number(u64, String),
    Set(Vec<(u64, String)>),
}

/// Digit runs longer than this are taken as text (expansion refuses such numbers).
const MAX_DIGITS: usize = 18;

fn parts_of(name: &str) -> Vec<Part> {
    let mut parts: Vec<Part> = Vec::new();
    let mut text = String::new();
    let mut chars = name.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        if !c.is_ascii_digit() {
            text.push(c);
            continue;
        }
        let mut end = at + 1;
        while let Some((i, d)) = chars.peek().copied() {
            if !d.is_ascii_digit() {
                break;
            }
            end = i + 1;
            chars.next();
        }
        let digits = &name[at..end];
        match digits.parse::<u64>() {
            Ok(value) if digits.len() <= MAX_DIGITS => {
                if !text.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut text)));
                }
                parts.push(Part::Number(value, digits.to_string()));
            }
            _ => text.push_str(digits),
        }
    }
    if !text.is_empty() {
        parts.push(Part::Text(text));
    }
    parts
}

/// A folded set of numbers (sorted) as a bracket group's inside: runs of consecutive values
/// spelled as the run's lower bound's width spells them (`08-11`, `8-11`), joined by commas.
/// Two spellings of one value (`9`, `09`) go to different runs.
fn render_set(set: &[(u64, String)]) -> String {
    use std::collections::BTreeSet;
    let mut left: BTreeSet<(u64, String)> = set.iter().cloned().collect();
    let mut items: Vec<String> = Vec::new();
    while let Some((first, lo)) = left.pop_first() {
        let width = lo.len();
        let mut last = (first, lo.clone());
        while let Some(next) = last.0.checked_add(1) {
            let candidate = (next, format!("{next:0width$}"));
            if !left.remove(&candidate) {
                break;
            }
            last = candidate;
        }
        items.push(if last.0 == first {
            lo
        } else {
            format!("{lo}-{}", last.1)
        });
    }
    items.join(",")
}

fn render(parts: &[Part]) -> String {
    parts
        .iter()
        .map(|p| match p {
            Part::Text(t) => t.clone(),
            Part::Number(_, spelled) => spelled.clone(),
            Part::Set(set) => format!("[{}]", render_set(set)),
        })
        .collect()
}

/// Folds `names` into one nodeset that [`expand`] turns back into exactly those names (each
/// once, in sorted order). Every numeric position is folded, the last first, then each
/// earlier one among names that agree on everything else. IPv6 addresses and names that a
/// nodeset cannot hold (brackets, commas) are listed as they are.
pub fn fold<S: AsRef<str>>(names: &[S]) -> String {
    use std::collections::{BTreeMap, BTreeSet};
    let unique: BTreeSet<&str> = names.iter().map(AsRef::as_ref).collect();
    let mut literal: Vec<String> = Vec::new();
    let mut items: Vec<Vec<Part>> = Vec::new();
    for name in unique {
        if name.contains([':', '[', ']', ',']) || name.is_empty() {
            literal.push(name.to_string());
        } else {
            items.push(parts_of(name));
        }
    }
    let dimensions = items
        .iter()
        .map(|p| p.iter().filter(|p| !matches!(p, Part::Text(_))).count())
        .max()
        .unwrap_or(0);
    for d in (0..dimensions).rev() {
        // Items that agree on everything but their d-th number fold together.
        let mut groups: BTreeMap<(String, usize), Vec<Vec<Part>>> = BTreeMap::new();
        let mut kept = Vec::new();
        for parts in items {
            let at = parts
                .iter()
                .enumerate()
                .filter(|(_, p)| !matches!(p, Part::Text(_)))
                .nth(d)
                .map(|(i, _)| i);
            match at {
                Some(at) if matches!(parts[at], Part::Number(..)) => {
                    let key = (
                        render(&parts[..at]) + "\u{0}" + &render(&parts[at + 1..]),
                        at,
                    );
                    groups.entry(key).or_default().push(parts);
                }
                _ => kept.push(parts),
            }
        }
        for ((_, at), group) in groups {
            if group.len() == 1 {
                kept.extend(group);
                continue;
            }
            let mut set: Vec<(u64, String)> = group
                .iter()
                .filter_map(|p| match &p[at] {
                    Part::Number(v, s) => Some((*v, s.clone())),
                    _ => None,
                })
                .collect();
            set.sort();
            let mut parts = group.into_iter().next().unwrap_or_default();
            parts[at] = Part::Set(set);
            kept.push(parts);
        }
        items = kept;
    }
    let mut out: Vec<(Vec<Part>, String)> = items
        .into_iter()
        .map(|p| {
            let text = render(&p);
            (p, text)
        })
        .collect();
    // Natural order: by each item's first name, numbers compared as numbers.
    out.sort_by(|a, b| order_key(&a.0).cmp(&order_key(&b.0)).then(a.1.cmp(&b.1)));
    let mut all: Vec<String> = out.into_iter().map(|(_, text)| text).collect();
    all.extend(literal);
    all.join(",")
}

/// Sorts folded items by their first name, numbers as numbers.
fn order_key(parts: &[Part]) -> Vec<(String, u64)> {
    parts
        .iter()
        .map(|p| match p {
            Part::Text(t) => (t.clone(), 0),
            Part::Number(v, _) => (String::new(), *v),
            Part::Set(set) => (String::new(), set.first().map_or(0, |(v, _)| *v)),
        })
        .collect()
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
        assert_eq!(names("n[1-2],fd00::1"), ["n1", "n2", "fd00::1"]);
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

    /// `fold` of `names` is `want`, and expands back to the same set.
    fn folds(list: &[&str], want: &str) {
        let folded = fold(list);
        assert_eq!(folded, want, "fold of {list:?}");
        let mut back = names(&folded);
        back.sort();
        let mut given: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        given.sort();
        given.dedup();
        assert_eq!(back, given, "{folded} expands to something else");
    }

    #[test]
    fn folding_writes_ranges_and_lists() {
        folds(&["n1", "n2", "n3", "n7"], "n[1-3,7]");
        folds(&["n3", "n1", "n2", "n2"], "n[1-3]");
        folds(&["alpha"], "alpha");
        folds(&["n9", "n10", "n11"], "n[9-11]");
        folds(&["n08", "n09", "n10"], "n[08-10]");
        folds(&["n9", "n09"], "n[09,9]");
        folds(&["n1", "n01", "n02"], "n[01-02,1]");
        folds(&["10.199.0.11", "10.199.0.12"], "10.199.0.[11-12]");
        folds(&["a", "b", "n1"], "a,b,n1");
        folds(&["fd00:199::11", "n1"], "n1,fd00:199::11");
        assert_eq!(fold::<&str>(&[]), "");
    }

    #[test]
    fn folding_folds_every_numeric_position() {
        folds(&["l1-1", "l1-2", "l2-1", "l2-2"], "l[1-2]-[1-2]");
        folds(&["l1-1", "l1-2", "l2-1"], "l1-[1-2],l2-1");
        folds(&["r1/l1-1", "r1/l1-2", "r2/l2-1"], "r1/l1-[1-2],r2/l2-1");
        folds(
            &["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02", "x"],
            "rack[1-2]-n[01-02],x",
        );
    }

    #[test]
    fn folding_round_trips_many_shapes() {
        let sets = [
            "n[1-100/3]",
            "n[001-120,500-520]",
            "r[1-3]-n[1-5],r4-n[2-3],gw",
            "10.1.[0-2].[1-40]",
            "a[1-2]b[3-4]c[5-6]",
            "n[98-102]",
            "x0,x00,x000,x1,x01",
        ];
        for set in sets {
            let list = names(set);
            let folded = fold(&list);
            let mut back = names(&folded);
            back.sort();
            let mut want = list.clone();
            want.sort();
            want.dedup();
            assert_eq!(back, want, "{set} folded to {folded}");
            assert!(
                folded.len() <= set.len().max(want.join(",").len()),
                "{set} → {folded}"
            );
        }
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
        // Found by the fuzzer (integration/fuzz, nodeset): few names, but long and many
        // groups, took 7 s and 900 MB when every group rebuilt every name.
        let slow = "[1-2]\u{0}\u{0}\u{0}[H][1-4]\u{11}\u{11}[H][H][1-2]\u{0}\u{0}\u{0}[1-4]\u{11}\u{11}[H][H][1-2]\u{0}\u{0}\u{0}\u{0}\u{11}[5][H]\u{11}[H]\u{0}\u{0}\u{0}\u{0}\u{11}[5][H]\u{11}\u{0}\u{0}\u{0}\u{11}[5][H]\u{11}[H]\u{0}\u{0}\u{0}\u{0}\u{11}[5]\u{0}\u{0}\u{0}[H][1-4]\u{11}\u{11}[H][H][1-2]\u{0}\u{0}\u{0}[1-4]\u{11}\u{11}[H][H][1-2]\u{0}\u{0}\u{0}\u{0}\u{11}[5][H]\u{11}[H]\u{0}\u{0}\u{0}\u{0}\u{11}[5][H]\u{11}\u{0}\u{0}\u{0}\u{11}[5][H]\u{11}[H]\u{0}\u{0}\u{0}\u{0}\u{11}[5][H]\u{11}\u{0}\u{0}\u{0}\u{11}[H]\u{11}\u{0}\u{0}\u{0}\u{11}[5][H]\u{11}\u{11}[H][H][1-4]\u{11}\u{11}[H][H][1-2]\u{0}\u{0}\u{0}\u{0}\u{11}[5][H]\u{11}[H]\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{11}[5][H]\u{11}[H]\u{0}\u{0}\u{0}\u{0}\u{11}[5][H]\u{11}\u{0}\u{0}\u{0}\u{11}[5][H]\u{11}[H]\u{0}\u{0}\u{0}\u{0}\u{11}[5][H]\u{11}\u{0}\u{0}\u{0}\u{11}[5][H]\u{11}\u{11}[H][H][1-4]\u{11}\u{11}[H][H][1-2]\u{0}\u{0}\u{0}\u{0}\u{11}[5][H]\u{11}[H]\u{0}\u{0}\u{0}\u{11}[5][H][H][H]";
        let err = expand(slow).expect_err("refused");
        assert!(err.message.contains("MiB of names"), "{err:?}");
        assert_eq!(expand("n[1-300][1-200]").map(|n| n.len()), Ok(60_000));
        fails(
            "n[1234567890123456789]",
            2,
            "`1234567890123456789` is too large",
        );
    }
}
