//! The few OpenSSH client settings arbor follows from the operator's ssh_config: today only
//! `HashKnownHosts`, so that keys learned under accept-new are written the way `ssh` would
//! write them (Debian's /etc/ssh/ssh_config says `HashKnownHosts yes` for every host).
//!
//! Read as ssh(1) reads them: the user's file, then the system-wide one; the first value
//! obtained wins; `Host` blocks apply when one of their patterns matches the host (`*`, `?`,
//! `!` negation); `Include` reads other files in place (globs in the file name, relative paths
//! from ~/.ssh or /etc/ssh). `Match` blocks other than `Match all` cannot be evaluated here and
//! are taken as not applying.

use std::path::{Path, PathBuf};

/// The system-wide client configuration.
pub const GLOBAL_FILE: &str = "/etc/ssh/ssh_config";

/// The files ssh(1) reads for a user whose home is `home`: `~/.ssh/config`, then the system's.
pub fn default_files(home: &Path) -> Vec<PathBuf> {
    vec![home.join(".ssh").join("config"), PathBuf::from(GLOBAL_FILE)]
}

/// Whether `HashKnownHosts yes` applies to `host` (as named on the command line) in `files`.
/// Missing or unreadable files count as empty; the default is no.
pub fn hash_known_hosts(files: &[PathBuf], host: &str) -> bool {
    lookup(files, host, "hashknownhosts").is_some_and(|v| v.eq_ignore_ascii_case("yes"))
}

/// The first value of `keyword` (lower case) that applies to `host`.
pub fn lookup(files: &[PathBuf], host: &str, keyword: &str) -> Option<String> {
    let mut reader = Reader {
        host,
        keyword,
        found: None,
    };
    for file in files {
        let base = if file.starts_with("/etc") {
            PathBuf::from("/etc/ssh")
        } else {
            file.parent().map(Path::to_path_buf).unwrap_or_default()
        };
        reader.file(file, &base, 0);
        if reader.found.is_some() {
            break;
        }
    }
    reader.found
}

struct Reader<'a> {
    host: &'a str,
    keyword: &'a str,
    found: Option<String>,
}

/// Include depth at which ssh(1) gives up too.
const MAX_INCLUDE_DEPTH: usize = 16;

impl Reader<'_> {
    fn file(&mut self, path: &Path, base: &Path, depth: usize) {
        if depth > MAX_INCLUDE_DEPTH {
            return;
        }
        if let Ok(text) = std::fs::read_to_string(path) {
            self.text(&text, base, depth);
        }
    }

    /// Reads `text`; settings before the first Host/Match line apply to every host.
    fn text(&mut self, text: &str, base: &Path, depth: usize) {
        let mut applies = true;
        for raw in text.lines() {
            if self.found.is_some() {
                return;
            }
            let Some((keyword, args)) = split_line(raw) else {
                continue;
            };
            match keyword.as_str() {
                "host" => applies = host_matches(&args, self.host),
                "match" => applies = args.len() == 1 && args[0].eq_ignore_ascii_case("all"),
                "include" if applies => {
                    for pattern in &args {
                        for file in expand_include(pattern, base) {
                            self.file(&file, base, depth + 1);
                        }
                    }
                }
                k if applies && k == self.keyword => {
                    if let Some(value) = args.first() {
                        self.found = Some(value.clone());
                    }
                }
                _ => {}
            }
        }
    }
}

/// `Keyword args...` or `Keyword=args`: the keyword in lower case and its arguments (double
/// quotes group words). Comments and blank lines give `None`.
fn split_line(raw: &str) -> Option<(String, Vec<String>)> {
    let line = raw.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let end = line
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(line.len());
    let keyword = line[..end].to_ascii_lowercase();
    let mut rest = line[end..].trim_start();
    if let Some(after) = rest.strip_prefix('=') {
        rest = after.trim_start();
    }
    let mut args = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in rest.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    args.push(std::mem::take(&mut current));
                    any = false;
                }
            }
            c => {
                current.push(c);
                any = true;
            }
        }
    }
    if any {
        args.push(current);
    }
    Some((keyword, args))
}

/// A `Host` line applies when a pattern matches and no negated one does.
fn host_matches(patterns: &[String], host: &str) -> bool {
    let mut matched = false;
    for pattern in patterns {
        if let Some(negated) = pattern.strip_prefix('!') {
            if super::known_hosts::wildcard_match(negated, host) {
                return false;
            }
        } else if super::known_hosts::wildcard_match(pattern, host) {
            matched = true;
        }
    }
    matched
}

/// The files an `Include` pattern names, sorted: `~/` is under $HOME, relative paths are under
/// `base` (~/.ssh or /etc/ssh), and `*`/`?` in the last component glob.
fn expand_include(pattern: &str, base: &Path) -> Vec<PathBuf> {
    let path = if let Some(rest) = pattern.strip_prefix("~/") {
        match std::env::var_os("HOME") {
            Some(home) => PathBuf::from(home).join(rest),
            None => return Vec::new(),
        }
    } else if pattern.starts_with('/') {
        PathBuf::from(pattern)
    } else {
        base.join(pattern)
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.contains(['*', '?']) {
        return vec![path];
    }
    let Some(dir) = path.parent() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| super::known_hosts::wildcard_match(&name, &e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("dir");
        }
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn first_value_wins_across_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let user = write(dir.path(), "user", "HashKnownHosts no\n");
        let system = write(dir.path(), "system", "Host *\n    HashKnownHosts yes\n");
        assert!(!hash_known_hosts(&[user.clone(), system.clone()], "h"));
        assert!(hash_known_hosts(std::slice::from_ref(&system), "h"));
        assert!(!hash_known_hosts(&[dir.path().join("missing")], "h"));
    }

    #[test]
    fn host_blocks_apply_by_pattern_and_negation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = write(
            dir.path(),
            "config",
            "# comment\nHost *.dc1 !bad.dc1\n  HashKnownHosts=yes\nHost other\n  HashKnownHosts no\n",
        );
        let files = [f];
        assert!(hash_known_hosts(&files, "n1.dc1"));
        assert!(!hash_known_hosts(&files, "bad.dc1"));
        assert!(!hash_known_hosts(&files, "n1.dc2"));
        assert_eq!(
            lookup(&files, "other", "hashknownhosts").as_deref(),
            Some("no")
        );
    }

    #[test]
    fn match_blocks_are_skipped_but_match_all_applies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = write(
            dir.path(),
            "config",
            "Match exec \"true\"\n  HashKnownHosts no\nMatch all\n  HashKnownHosts \"yes\"\n",
        );
        assert!(hash_known_hosts(&[f], "h"));
    }

    #[test]
    fn includes_are_read_in_place_with_globs() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            "conf.d/10-a.conf",
            "Host a\n  HashKnownHosts yes\n",
        );
        write(dir.path(), "conf.d/20-b.conf", "HashKnownHosts no\n");
        write(dir.path(), "conf.d/ignored.txt", "HashKnownHosts yes\n");
        let main = write(
            dir.path(),
            "config",
            &format!(
                "Include {}/conf.d/*.conf\nHost *\n  HashKnownHosts yes\n",
                dir.path().display()
            ),
        );
        let files = [main];
        // For "a", 10-a.conf says yes first; for others, 20-b.conf says no before the Host *.
        assert!(hash_known_hosts(&files, "a"));
        assert!(!hash_known_hosts(&files, "b"));
        // A relative include is under the including file's dir; a loop ends at the depth limit.
        let looped = write(dir.path(), "loop", "Include loop\n");
        assert!(!hash_known_hosts(&[looped], "h"));
    }

    #[test]
    fn lines_split_like_ssh() {
        assert_eq!(
            split_line("  HashKnownHosts=yes "),
            Some(("hashknownhosts".into(), vec!["yes".into()]))
        );
        assert_eq!(
            split_line("Host a \"b c\""),
            Some(("host".into(), vec!["a".into(), "b c".into()]))
        );
        assert_eq!(split_line("   # x"), None);
    }
}
