//! Flag defaults from outside the command line: `/etc/arbor/config.toml`, then the user's
//! `$XDG_CONFIG_HOME/arbor/config.toml` (`~/.config/arbor/config.toml`), then `ARBOR_*`
//! environment variables, each beating the one before; the command line beats them all.
//!
//! The layer works on clap's own definitions before parsing: each value found is checked with
//! the flag's value parser (so a config file is held to exactly what the flag accepts, and an
//! error names `file:line:col` or the variable), then becomes that flag's default. What a
//! flag means stays in one place, `cli`, and `--help` shows the defaults in effect. A config
//! file with a key it does not know is an error, never ignored. Values are never echoed in
//! errors: a config file may hold an etcd URL with a password in it.
//!
//! A node staged by a parent (`arbor run --depth N`) reads none of this: its settings come
//! down the link (`NodeConfig`), so a host's own files cannot change a run.

use std::path::{Path, PathBuf};

/// The system-wide config file.
pub const SYSTEM_CONFIG: &str = "/etc/arbor/config.toml";

/// How a key's value is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// One value: a string or an integer.
    Value,
    /// `true` or `false` (a flag that takes no value on the command line).
    Flag,
    /// A list: an array of strings (or one string); comma-separated in the environment.
    List,
}

/// One key of the config files, and the flag it sets a default for.
struct Key {
    /// The key, as the long flag is spelled (`link-timeout` for `--link-timeout`).
    name: &'static str,
    /// clap's id for the flag (the field's name).
    id: &'static str,
    shape: Shape,
    /// The subcommands whose flag it sets; empty: a global flag.
    subcommands: &'static [&'static str],
    /// The value may hold a secret: `--help` does not show it as the default.
    secret: bool,
}

const RUN_EXEC: &[&str] = &["run", "exec"];
const RUN: &[&str] = &["run"];
const GLOBAL: &[&str] = &[];

const fn key(
    name: &'static str,
    id: &'static str,
    shape: Shape,
    sub: &'static [&'static str],
) -> Key {
    Key {
        name,
        id,
        shape,
        subcommands: sub,
        secret: false,
    }
}

/// Every key the config files know (docs/config.md lists them).
const KEYS: &[Key] = &[
    key("quiet", "quiet", Shape::Flag, GLOBAL),
    key("log-file", "log_file", Shape::Value, GLOBAL),
    key("color", "color", Shape::Value, GLOBAL),
    key("link-timeout", "link_timeout", Shape::Value, RUN_EXEC),
    key("reconnect-grace", "reconnect_grace", Shape::Value, RUN_EXEC),
    key("cconns", "cconns", Shape::Value, RUN_EXEC),
    key("connect-timeout", "connect_timeout", Shape::Value, RUN_EXEC),
    key("host-key-policy", "host_key_policy", Shape::Value, RUN_EXEC),
    key("ssh-config", "ssh_config", Shape::Value, RUN_EXEC),
    key("identity", "identities", Shape::List, RUN_EXEC),
    key("known-hosts", "known_hosts", Shape::List, RUN_EXEC),
    key("binary", "binaries", Shape::List, RUN_EXEC),
    key("remote-tmp", "remote_tmp", Shape::Value, RUN_EXEC),
    key("no-caching", "no_caching", Shape::Flag, RUN_EXEC),
    key("compress", "compress", Shape::Value, RUN_EXEC),
    key("transport", "transport", Shape::Value, RUN_EXEC),
    key("quic-ports", "quic_ports", Shape::Value, RUN_EXEC),
    key("congestion", "congestion", Shape::Value, RUN_EXEC),
    key(
        "allow-interactive",
        "allow_interactive",
        Shape::Flag,
        RUN_EXEC,
    ),
    key("become", "escalate", Shape::Flag, RUN_EXEC),
    key(
        "become-password-file",
        "become_password_file",
        Shape::Value,
        RUN_EXEC,
    ),
    key("password-file", "password_file", Shape::Value, RUN_EXEC),
    key("output", "output", Shape::Value, RUN),
    key("diff", "diff", Shape::Flag, RUN),
    key("converged-timeout", "converged_timeout", Shape::Value, RUN),
    key("tmp-prefix", "tmp_prefix", Shape::Flag, RUN),
    key("cache-max-size", "cache_max_size", Shape::Value, RUN),
    Key {
        secret: true,
        ..key("seeds", "seeds", Shape::List, RUN)
    },
    key("seeds-user", "seeds_user", Shape::Value, RUN),
    key(
        "seeds-password-file",
        "seeds_password_file",
        Shape::Value,
        RUN,
    ),
];

impl Key {
    /// `ARBOR_LINK_TIMEOUT` for `link-timeout`.
    fn env_name(&self) -> String {
        format!("ARBOR_{}", self.name.to_uppercase().replace('-', "_"))
    }
}

/// Where defaults come from: the two files (a missing file is no error) and the environment.
pub struct Sources {
    pub system: PathBuf,
    pub user: Option<PathBuf>,
    pub env: Vec<(String, String)>,
}

impl Sources {
    /// This process's: /etc/arbor/config.toml, `$XDG_CONFIG_HOME/arbor/config.toml` (an
    /// absolute `XDG_CONFIG_HOME` only, as the XDG spec says) else
    /// `$HOME/.config/arbor/config.toml`, and the environment.
    pub fn of_process() -> Sources {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let user = var("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".config")))
            .map(|dir| dir.join("arbor/config.toml"));
        Sources {
            system: PathBuf::from(SYSTEM_CONFIG),
            user,
            env: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .filter(|(k, _)| k.starts_with("ARBOR_"))
                .collect(),
        }
    }
}

/// Where a value came from, for errors.
#[derive(Clone, Debug)]
enum Origin {
    /// `path:line:col`.
    File(String),
    Env(String),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::File(at) => f.write_str(at),
            Origin::Env(name) => f.write_str(name),
        }
    }
}

/// `cmd` with the defaults `sources` give; `Err` is the message for the user (exit 2).
pub fn apply(mut cmd: clap::Command, sources: &Sources) -> Result<clap::Command, String> {
    // Later layers overwrite earlier ones.
    let mut chosen: Vec<Option<(Vec<String>, Origin)>> = vec![None; KEYS.len()];
    let mut files = vec![sources.system.as_path()];
    files.extend(sources.user.as_deref());
    for path in files {
        for (i, values, origin) in read_file(path)? {
            chosen[i] = Some((values, origin));
        }
    }
    for (i, key) in KEYS.iter().enumerate() {
        let name = key.env_name();
        if let Some((_, value)) = sources.env.iter().find(|(k, _)| *k == name) {
            chosen[i] = Some((env_values(key, value, &name)?, Origin::Env(name)));
        }
    }
    for (key, chosen) in KEYS.iter().zip(chosen) {
        let Some((values, origin)) = chosen else {
            continue;
        };
        check(&cmd, key, &values, &origin)?;
        let set = |arg: clap::Arg| {
            arg.default_values(values.clone())
                .hide_default_value(key.secret)
        };
        if key.subcommands.is_empty() {
            cmd = cmd.mut_arg(key.id, set);
        } else {
            for sub in key.subcommands {
                cmd = cmd.mut_subcommand(sub, |s| s.mut_arg(key.id, set));
            }
        }
    }
    Ok(cmd)
}

/// The values clap would accept for `key`'s flag: each through the flag's value parser.
fn check(cmd: &clap::Command, key: &Key, values: &[String], origin: &Origin) -> Result<(), String> {
    if key.shape == Shape::Flag {
        return Ok(());
    }
    let owner = match key.subcommands.first() {
        Some(sub) => cmd.find_subcommand(sub),
        None => Some(cmd),
    };
    let arg = owner.and_then(|c| c.get_arguments().find(|a| a.get_id() == key.id));
    let Some(arg) = arg else {
        return Err(format!(
            "{origin}: {}: no such flag (a bug in arbor)",
            key.name
        ));
    };
    // The flag alone, so that its conflicts and requirements do not get in the way.
    let probe = clap::Command::new("arbor").no_binary_name(true).arg(
        clap::Arg::new("value")
            .long("value")
            .num_args(1)
            .value_parser(arg.get_value_parser().clone()),
    );
    for value in values {
        if let Err(e) = probe
            .clone()
            .try_get_matches_from(["--value", value.as_str()])
        {
            let why = match arg.get_possible_values() {
                v if !v.is_empty() && e.kind() == clap::error::ErrorKind::InvalidValue => {
                    let names: Vec<&str> = v.iter().map(|p| p.get_name()).collect();
                    format!("expected one of {}", names.join(", "))
                }
                _ => format!("not a value --{} accepts", key.name),
            };
            return Err(format!("{origin}: {}: invalid value: {why}", key.name));
        }
    }
    Ok(())
}

/// An environment variable's value as the flag's values.
fn env_values(key: &Key, value: &str, name: &str) -> Result<Vec<String>, String> {
    Ok(match key.shape {
        Shape::Value => vec![value.to_string()],
        Shape::List => value
            .split(',')
            .filter(|v| !v.is_empty())
            .map(str::to_string)
            .collect(),
        Shape::Flag => match value.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => vec!["true".into()],
            "0" | "false" | "no" | "off" | "" => vec!["false".into()],
            _ => return Err(format!("{name}: invalid value: expected true or false")),
        },
    })
}

/// The keys set in one config file: (index in [`KEYS`], values, where). A missing file
/// sets nothing.
fn read_file(path: &Path) -> Result<Vec<(usize, Vec<String>, Origin)>, String> {
    let shown = path.display();
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{shown}: {e}")),
    };
    let at = |offset: usize| {
        let (line, col) = line_col(&text, offset);
        format!("{shown}:{line}:{col}")
    };
    let table = toml::de::DeTable::parse(&text).map_err(|e| {
        format!(
            "{}: {}",
            at(e.span().map_or(0, |s| s.start)),
            e.message().trim_end()
        )
    })?;
    let mut found = Vec::new();
    for (name, value) in table.get_ref().iter() {
        let here = at(name.span().start);
        let Some(i) = KEYS.iter().position(|k| k.name == name.get_ref().as_ref()) else {
            let known: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
            return Err(format!(
                "{here}: unknown key `{}` (known keys: {}; see docs/config.md)",
                crate::ui::printable(name.get_ref()),
                known.join(", ")
            ));
        };
        let key = &KEYS[i];
        let value_at = Origin::File(at(value.span().start));
        let values = toml_values(key, value.get_ref())
            .map_err(|want| format!("{value_at}: {}: expected {want}", key.name))?;
        found.push((i, values, value_at));
    }
    Ok(found)
}

/// A TOML value as the flag's values; `Err` says what was expected.
fn toml_values(key: &Key, value: &toml::de::DeValue<'_>) -> Result<Vec<String>, &'static str> {
    use toml::de::DeValue;
    let scalar = |v: &DeValue<'_>| match v {
        DeValue::String(s) => Some(s.to_string()),
        DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
            .ok()
            .map(|n| n.to_string()),
        _ => None,
    };
    match key.shape {
        Shape::Flag => value
            .as_bool()
            .map(|b| vec![b.to_string()])
            .ok_or("true or false"),
        Shape::Value => scalar(value).map(|v| vec![v]).ok_or("a string or a number"),
        Shape::List => match value {
            DeValue::Array(items) => items
                .iter()
                .map(|item| match item.get_ref() {
                    DeValue::String(s) => Ok(s.to_string()),
                    _ => Err("an array of strings"),
                })
                .collect(),
            DeValue::String(s) => Ok(vec![s.to_string()]),
            _ => Err("an array of strings"),
        },
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before, |nl| &before[nl + 1..])
        .chars()
        .count()
        + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(dir: &Path, system: &str, user: &str, env: &[(&str, &str)]) -> Sources {
        let (s, u) = (dir.join("system.toml"), dir.join("user.toml"));
        std::fs::write(&s, system).expect("write");
        std::fs::write(&u, user).expect("write");
        Sources {
            system: s,
            user: Some(u),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// The run's flags as parsed with these defaults and this command line.
    fn run_matches(sources: &Sources, argv: &[&str]) -> clap::ArgMatches {
        let cmd = apply(crate::cli::command(), sources).expect("defaults");
        let mut full = vec!["arbor", "run", "--file", "g.yaml"];
        full.extend_from_slice(argv);
        let matches = cmd.try_get_matches_from(full).expect("parse");
        matches.subcommand_matches("run").expect("run").clone()
    }

    #[test]
    fn command_line_beats_environment_beats_user_beats_system() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cconns = |s: &Sources, argv: &[&str]| {
            *run_matches(s, argv)
                .get_one::<usize>("cconns")
                .expect("cconns")
        };
        let s = sources(dir.path(), "cconns = 3\nremote-tmp = \"/sys\"\n", "", &[]);
        assert_eq!(cconns(&s, &[]), 3);
        let s = sources(dir.path(), "cconns = 3\n", "cconns = 5\n", &[]);
        assert_eq!(cconns(&s, &[]), 5);
        let s = sources(
            dir.path(),
            "cconns = 3\n",
            "cconns = 5\n",
            &[("ARBOR_CCONNS", "9")],
        );
        assert_eq!(cconns(&s, &[]), 9);
        assert_eq!(cconns(&s, &["--cconns", "11"]), 11);
        // Keys of different layers combine.
        let s = sources(
            dir.path(),
            "remote-tmp = \"/var/tmp\"
compress = \"always\"
reconnect-grace = 20
",
            "identity = [\"/k1\", \"/k2\"]\n",
            &[("ARBOR_LINK_TIMEOUT", "7")],
        );
        let m = run_matches(&s, &[]);
        assert_eq!(
            m.get_one::<String>("remote_tmp").map(String::as_str),
            Some("/var/tmp")
        );
        assert_eq!(
            m.get_one::<String>("compress").map(String::as_str),
            Some("always")
        );
        assert_eq!(m.get_one::<u64>("link_timeout"), Some(&7));
        assert_eq!(m.get_one::<u64>("reconnect_grace"), Some(&20));
        let keys: Vec<&PathBuf> = m.get_many::<PathBuf>("identities").expect("ids").collect();
        assert_eq!(keys, [&PathBuf::from("/k1"), &PathBuf::from("/k2")]);
        // A value set in a file is changed for one run from the environment, and on the
        // command line, where `--compress` alone means always.
        let s = sources(
            dir.path(),
            "compress = \"always\"\n",
            "",
            &[("ARBOR_COMPRESS", "never")],
        );
        let compress = |args: &[&str]| {
            run_matches(&s, args)
                .get_one::<String>("compress")
                .cloned()
                .unwrap_or_default()
        };
        assert_eq!(compress(&[]), "never");
        assert_eq!(compress(&["--compress"]), "always");
        assert_eq!(compress(&["--compress", "auto"]), "auto");
    }

    #[test]
    fn bad_files_and_values_name_their_place_and_never_echo_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = |system: &str, user: &str, env: &[(&str, &str)]| {
            let s = sources(dir.path(), system, user, env);
            match apply(crate::cli::command(), &s) {
                Ok(_) => panic!("accepted {system:?} {user:?} {env:?}"),
                Err(e) => e,
            }
        };
        let e = err(
            "cconns = 3\n",
            "output = \"json\"\n  outptu = \"text\"\n",
            &[],
        );
        assert!(e.contains("user.toml:2:3: unknown key `outptu`"), "{e}");
        let e = err("cconns = \"many\"\n", "", &[]);
        assert!(e.contains("system.toml:1:10: cconns: invalid value"), "{e}");
        let e = err("output = \"xml\"\n", "", &[]);
        assert!(
            e.contains("system.toml:1:10: output: invalid value: expected one of auto, text, json"),
            "{e}"
        );
        let e = err("compress = \"yes\"\n", "", &[]);
        assert!(
            e.contains("compress: invalid value: expected one of never, auto, always"),
            "{e}"
        );
        // The key was a boolean before it took never|auto|always.
        let e = err("compress = true\n", "", &[]);
        assert!(
            e.contains("system.toml:1:12: compress: expected a string"),
            "{e}"
        );
        let e = err("no-caching = \"yes\"\n", "", &[]);
        assert!(
            e.contains("system.toml:1:14: no-caching: expected true or false"),
            "{e}"
        );
        let e = err("[run]\ncconns = 1\n", "", &[]);
        assert!(e.contains("system.toml:1:2: unknown key `run`"), "{e}");
        let e = err("cconns = \n", "", &[]);
        assert!(e.contains("system.toml:1:"), "{e}");
        let e = err("", "", &[("ARBOR_LINK_TIMEOUT", "soon")]);
        assert!(
            e.contains("ARBOR_LINK_TIMEOUT: link-timeout: invalid value"),
            "{e}"
        );
        let e = err("host-key-policy = \"trust-me:hunter2\"\n", "", &[]);
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn docs_config_md_lists_every_key_and_variable() {
        let doc =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/config.md"))
                .expect("docs/config.md");
        for key in KEYS {
            let row = format!("| `{}` | `{}` |", key.name, key.env_name());
            assert!(doc.contains(&row), "docs/config.md has no row {row}");
        }
    }

    #[test]
    fn line_and_column_count_characters_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("é = 1\nx", 6), (1, 6));
    }
}
