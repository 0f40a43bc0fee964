use super::*;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("dir");
    }
    std::fs::write(&path, text).expect("write");
    path
}

/// A home with `~/.ssh/config` holding `text`; the config read from it alone (as -F).
fn config(text: &str) -> (tempfile::TempDir, SshConfig) {
    let home = tempfile::tempdir().expect("tempdir");
    let file = write(home.path(), ".ssh/config", text);
    let config = SshConfig::load_file(&file, home.path()).expect("load");
    (home, config)
}

fn resolve(config: &SshConfig, host: &str) -> HostConfig {
    config
        .resolve(host, &Preset::default())
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn first_value_wins_across_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let user = write(dir.path(), "user", "HashKnownHosts no\n");
    let system = write(dir.path(), "system", "Host *\n    HashKnownHosts yes\n");
    assert!(!hash_known_hosts(&[user.clone(), system.clone()], "h"));
    assert!(hash_known_hosts(std::slice::from_ref(&system), "h"));
    assert!(!hash_known_hosts(&[dir.path().join("missing")], "h"));

    let both = SshConfig::read(
        &[
            Source::User(write(dir.path(), "u2", "Host web\n  Port 2200\n")),
            Source::System(write(
                dir.path(),
                "s2",
                "Host *\n  Port 22\n  User admin\n  IdentityFile /k/one\n",
            )),
        ],
        dir.path(),
        false,
    )
    .expect("read");
    let web = resolve(&both, "web");
    assert_eq!((web.port, web.user.as_str()), (2200, "admin"));
    assert_eq!(web.identity_files, vec![PathBuf::from("/k/one")]);
}

#[test]
fn host_blocks_apply_by_pattern_and_negation() {
    let (_home, c) = config(
        "# comment\nHost *.dc1 !bad.dc1\n  User ops # trailing comment\n  HashKnownHosts=yes\n\
         Host n?.dc2\n  User two\nHost other\n  HashKnownHosts no\n",
    );
    assert_eq!(resolve(&c, "n1.dc1").user, "ops");
    assert!(
        resolve(&c, "N1.DC1").hash_known_hosts,
        "host names match case-blind"
    );
    assert_ne!(resolve(&c, "bad.dc1").user, "ops");
    assert_eq!(resolve(&c, "n7.dc2").user, "two");
    assert_ne!(resolve(&c, "n17.dc2").user, "two");
    assert_eq!(c.lookup("other", "hashknownhosts").as_deref(), Some("no"));
}

#[test]
fn the_first_value_obtained_wins_and_presets_come_first() {
    let (_home, c) = config(
        "Host web\n  HostName 10.0.0.5\n  Port 2222\n  IdentityFile ~/.ssh/web\n\
         Host *\n  HostName nope\n  User ops\n  Port 22\n  IdentityFile ~/.ssh/all\n",
    );
    let web = resolve(&c, "web");
    assert_eq!(web.hostname, "10.0.0.5");
    assert_eq!((web.user.as_str(), web.port), ("ops", 2222));
    // IdentityFile accumulates, in order.
    let names: Vec<_> = web
        .identity_files
        .iter()
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(names, ["web", "all"]);
    let preset = Preset {
        user: Some("me".into()),
        port: Some(2022),
    };
    let web = c.resolve("web", &preset).expect("resolve");
    assert_eq!((web.user.as_str(), web.port), ("me", 2022));
    // Without any setting: the host itself, the local user, 22.
    let (_h, empty) = config("");
    let plain = resolve(&empty, "h");
    assert_eq!(
        (plain.hostname.as_str(), plain.user, plain.port),
        ("h", crate::ssh::local_user(), 22)
    );
    assert!(plain.proxy_jump.is_empty() && plain.accept_new.is_none());
}

#[test]
fn tokens_expand_in_hostname_and_file_names() {
    let (home, c) = config(
        "Host *.short\n  HostName %h.example.org\n  User deploy\n  Port 2200\n\
           IdentityFile ~/.ssh/id_%h_%r_%p\n  IdentityFile %d/keys/%n-%u\n\
           IdentityFile /k/100%%\n  UserKnownHostsFile ~/.ssh/kh_%h /etc/kh\n",
    );
    let h = resolve(&c, "a.short");
    let d = home.path().display();
    let u = crate::ssh::local_user();
    assert_eq!(h.hostname, "a.short.example.org");
    assert_eq!(
        h.identity_files,
        vec![
            PathBuf::from(format!("{d}/.ssh/id_a.short.example.org_deploy_2200")),
            PathBuf::from(format!("{d}/keys/a.short-{u}")),
            PathBuf::from("/k/100%"),
        ]
    );
    assert_eq!(
        h.user_known_hosts,
        Some(vec![
            PathBuf::from(format!("{d}/.ssh/kh_a.short.example.org")),
            PathBuf::from("/etc/kh")
        ])
    );
    let (_h2, bad) = config("IdentityFile ~/.ssh/%C\n");
    let err = bad.resolve("x", &Preset::default()).expect_err("%C");
    assert!(
        err.contains("config:1: IdentityFile ~/.ssh/%C: token %C"),
        "{err}"
    );
}

#[test]
fn includes_are_read_in_place_with_globs_relative_to_dot_ssh() {
    let home = tempfile::tempdir().expect("tempdir");
    let h = home.path();
    write(
        h,
        ".ssh/conf.d/10-a.conf",
        "Host a\n  HashKnownHosts yes\n  User from-a\n",
    );
    write(h, ".ssh/conf.d/20-b.conf", "HashKnownHosts no\n");
    write(h, ".ssh/conf.d/ignored.txt", "HashKnownHosts yes\n");
    write(h, ".ssh/deep/x/inc.conf", "Host deep\n  User deep-user\n");
    write(h, ".ssh/only-web", "User web-user\nHost *\n  Port 2022\n");
    let main = write(
        h,
        ".ssh/config",
        "Include conf.d/*.conf\nInclude deep/*/inc.conf\n\
         Host web\n  Include only-web\n  Port 1\nHost *\n  HashKnownHosts yes\n",
    );
    let c = SshConfig::load_file(&main, h).expect("load");
    // For "a", 10-a.conf says yes first; for others, 20-b.conf says no before the Host *.
    assert!(resolve(&c, "a").hash_known_hosts);
    assert_eq!(resolve(&c, "a").user, "from-a");
    assert!(!resolve(&c, "b").hash_known_hosts);
    assert_eq!(resolve(&c, "deep").user, "deep-user");
    // An Include inside a block applies for that block's hosts only, and the block goes on
    // after it: web gets the included User and Port (the included `Host *` matched), not 1.
    let web = resolve(&c, "web");
    assert_eq!((web.user.as_str(), web.port), ("web-user", 2022));
    let other = resolve(&c, "other");
    assert_ne!(other.user, "web-user");
    assert_eq!(
        other.port, 22,
        "an Include in a block that does not apply adds nothing"
    );
    // A loop is an error naming the file and line.
    let looped = write(h, ".ssh/loop", "Include loop\n");
    let err = SshConfig::load_file(&looped, h).expect_err("loop");
    assert!(err.contains("loop:1: Include nested"), "{err}");
}

#[test]
fn match_host_originalhost_user_and_all() {
    let (_home, c) = config(
        "Host web\n  HostName 10.1.0.5\n\
         Match host 10.1.*\n  User by-address\n\
         Match originalhost db*,!db9 user ops\n  Port 2201\n\
         Match !originalhost db*\n  IdentitiesOnly yes\n\
         Match exec \"true\"\n  Port 9\n\
         Match all\n  HashKnownHosts \"yes\"\n",
    );
    let web = resolve(&c, "web");
    assert_eq!(web.user, "by-address", "Match host sees the HostName");
    assert!(web.identities_only && web.hash_known_hosts);
    assert_eq!(web.port, 22, "Match exec is not evaluated");
    assert!(
        web.warnings
            .iter()
            .any(|w| w.contains("config:9: Match exec is not supported")),
        "{:?}",
        web.warnings
    );
    let ops = Preset {
        user: Some("ops".into()),
        port: None,
    };
    assert_eq!(c.resolve("db1", &ops).expect("db1").port, 2201);
    assert_eq!(c.resolve("db9", &ops).expect("db9").port, 22);
    assert_eq!(resolve(&c, "db1").port, 22, "Match user is ops only");
    assert!(!resolve(&c, "db1").identities_only);
    let (_h2, local) = config(&format!(
        "Match localuser {}\n  User matched-local\n",
        crate::ssh::local_user()
    ));
    assert_eq!(resolve(&local, "x").user, "matched-local");
}

#[test]
fn proxy_jump_and_its_none() {
    let (_home, c) = config(
        "Host direct\n  ProxyJump none\nHost cmd\n  ProxyCommand nc %h %p\n\
         Host *\n  ProxyJump bastion,ops@mid:2222,ssh://[fd00::1]:22\n",
    );
    let hops = resolve(&c, "leaf").proxy_jump;
    assert_eq!(
        hops,
        vec![
            JumpHost {
                user: None,
                host: "bastion".into(),
                port: None
            },
            JumpHost {
                user: Some("ops".into()),
                host: "mid".into(),
                port: Some(2222)
            },
            JumpHost {
                user: None,
                host: "fd00::1".into(),
                port: Some(22)
            },
        ]
    );
    assert!(resolve(&c, "direct").proxy_jump.is_empty());
    let cmd = resolve(&c, "cmd");
    assert!(cmd.proxy_jump.is_empty(), "ProxyCommand came first");
    assert!(
        cmd.warnings
            .iter()
            .any(|w| w.contains("ProxyCommand is not supported")),
        "{:?}",
        cmd.warnings
    );
    let (_h2, bad) = config("ProxyJump h:99999\n");
    assert!(bad.resolve("x", &Preset::default()).is_err());
}

#[test]
fn strict_host_key_checking_never_turns_checks_off() {
    let (_home, c) = config(
        "Host a\n  StrictHostKeyChecking accept-new\nHost y\n  StrictHostKeyChecking yes\n\
         Host n\n  StrictHostKeyChecking no\nHost o\n  StrictHostKeyChecking off\n\
         Host bad\n  StrictHostKeyChecking maybe\n",
    );
    assert_eq!(resolve(&c, "a").accept_new, Some(true));
    assert_eq!(resolve(&c, "y").accept_new, Some(false));
    for host in ["n", "o"] {
        let h = resolve(&c, host);
        assert_eq!(h.accept_new, Some(false), "{host}: checked as strict");
        assert!(
            h.warnings.iter().any(|w| w.contains("is not honoured")),
            "{:?}",
            h.warnings
        );
    }
    assert_eq!(resolve(&c, "other").accept_new, None);
    assert!(c.resolve("bad", &Preset::default()).is_err());
}

#[test]
fn other_settings_and_warnings() {
    let (_home, c) = config(
        "Host *\n  ConnectTimeout 1m30s\n  IdentitiesOnly yes\n  GlobalKnownHostsFile none\n\
           UserKnownHostsFile none\n  HostKeyAlias other\n  Ciphers aes128-ctr\n\
           SendEnv LANG\n  GSSAPIAuthentication yes\n  NoSuchKeyword at-all\n",
    );
    let h = resolve(&c, "x");
    assert_eq!(h.connect_timeout, Some(90));
    assert!(h.identities_only);
    assert_eq!(h.global_known_hosts, Some(Vec::new()));
    assert_eq!(h.user_known_hosts, Some(Vec::new()));
    assert_eq!(h.warnings.len(), 2, "{:?}", h.warnings);
    assert!(h.warnings[0].contains("config:6: HostKeyAlias is not supported"));
    assert!(h.warnings[1].contains("config:7: Ciphers is not supported"));
    let (_h2, bad) = config("Port ssh\n");
    let err = bad.resolve("x", &Preset::default()).expect_err("bad port");
    assert!(err.contains("config:1: port ssh: not a port"), "{err}");
}

#[test]
fn a_named_file_must_exist_and_none_reads_nothing() {
    let home = tempfile::tempdir().expect("tempdir");
    let err = SshConfig::load_file(&home.path().join("nope"), home.path()).expect_err("missing");
    assert!(err.contains("nope"), "{err}");
    let none = SshConfig::load_file(Path::new("none"), home.path()).expect("none");
    assert_eq!(resolve(&none, "h").hostname, "h");
    // The default files may be missing.
    assert!(SshConfig::load_default(home.path()).is_ok());
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
    assert_eq!(parse_seconds("90"), Some(90));
    assert_eq!(parse_seconds("1h2m3s"), Some(3723));
    assert_eq!(parse_seconds("5x"), None);
}
