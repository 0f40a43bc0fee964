//! End-to-end tests of hierarchical runs: topology files, relays at depth 2 and 3, jump hosts,
//! teardown at every depth, a killed relay, and host keys learned at depth. The lab is 2 relays
//! × 3 leaves; the leaves are unreachable from the initiator, and the relays hold no private
//! key, so every leaf is reached through a relay signing with the initiator's key. Two hosts
//! run Debian's dropbear instead of OpenSSH: the relay r2 and the leaf l1-2 (under r1). The leaf
//! l2-3 (under r2) has a root of its own with systemd as pid 1 (`lab up --init`), where the pkg
//! and svc tests install packages and run services.

#[macro_use]
mod support;

use support::harness::{
    Running, Test, TestResult, exited, fail, lines_of, lines_of_both, output_text as text,
    wait_lines,
};

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use support::Lab;
use support::terminal::Terminal;

const ARBOR: &str = env!("CARGO_BIN_EXE_arbor");
const HOSTS: [&str; 8] = ["r1", "r2", "l1-1", "l1-2", "l1-3", "l2-1", "l2-2", "l2-3"];
const LEAVES: [&str; 6] = ["l1-1", "l1-2", "l1-3", "l2-1", "l2-2", "l2-3"];
/// The leaf with its own root and systemd as pid 1 (`lab up --init`), under r2.
const SYSTEM_HOST: &str = "l2-3";

fn main() -> std::process::ExitCode {
    // Re-run inside a relay by the seeding attack test: a hostile seeder.
    if let Ok(spec) = std::env::var("ARBOR_TREE_HOSTILE_SEEDER") {
        return hostile_seeder(&spec);
    }
    let tests: Vec<Test> = vec![
        (
            "a_40_mib_artifact_crosses_the_link_once_with_sibling_seeding_and_twice_when_cut",
            a_40_mib_artifact_crosses_the_link_once_with_sibling_seeding_and_twice_when_cut,
        ),
        (
            "a_sibling_fetch_needs_its_capability_once_and_garbage_from_a_seeder_is_not_kept",
            a_sibling_fetch_needs_its_capability_once_and_garbage_from_a_seeder_is_not_kept,
        ),
        (
            "the_binarys_first_copy_crosses_the_link_once_with_sibling_seeding_and_twice_when_cut",
            the_binarys_first_copy_crosses_the_link_once_with_sibling_seeding_and_twice_when_cut,
        ),
        (
            "leaves_exchange_files_through_relays_with_one_binary_per_relay_on_the_link",
            leaves_exchange_files_through_relays_with_one_binary_per_relay_on_the_link,
        ),
        (
            "the_initiators_store_holds_a_lease_and_a_watch_per_relay_not_per_leaf",
            the_initiators_store_holds_a_lease_and_a_watch_per_relay_not_per_leaf,
        ),
        (
            "collected_files_are_summarized_per_host_at_info_and_listed_one_by_one_under_v",
            collected_files_are_summarized_per_host_at_info_and_listed_one_by_one_under_v,
        ),
        (
            "relays_with_keys_of_their_own_still_sign_for_their_leaves",
            relays_with_keys_of_their_own_still_sign_for_their_leaves,
        ),
        (
            "a_relay_under_a_relay_works_at_depth_3",
            a_relay_under_a_relay_works_at_depth_3,
        ),
        (
            "jump_hosts_give_the_same_result",
            jump_hosts_give_the_same_result,
        ),
        (
            "ctrl_c_tears_down_every_depth",
            ctrl_c_tears_down_every_depth,
        ),
        (
            "sigterm_tears_down_every_depth_with_the_summary_and_exit_143",
            sigterm_tears_down_every_depth_with_the_summary_and_exit_143,
        ),
        (
            "a_second_signal_during_teardown_exits_at_once_naming_the_hosts_left",
            a_second_signal_during_teardown_exits_at_once_naming_the_hosts_left,
        ),
        (
            "ctrl_c_during_staging_leaves_no_working_dir_or_partial_cache_file",
            ctrl_c_during_staging_leaves_no_working_dir_or_partial_cache_file,
        ),
        (
            "a_leaf_of_another_platform_gets_its_build_once_through_its_relay",
            a_leaf_of_another_platform_gets_its_build_once_through_its_relay,
        ),
        (
            "a_child_that_never_says_hello_fails_after_the_hello_timeout_and_is_stopped",
            a_child_that_never_says_hello_fails_after_the_hello_timeout_and_is_stopped,
        ),
        (
            "connect_timeout_applies_at_depth_2",
            connect_timeout_applies_at_depth_2,
        ),
        (
            "remote_tmp_and_verbosity_apply_at_depth_2",
            remote_tmp_and_verbosity_apply_at_depth_2,
        ),
        (
            "a_relays_graph_cannot_use_the_agent_to_log_in_outside_its_subtree",
            a_relays_graph_cannot_use_the_agent_to_log_in_outside_its_subtree,
        ),
        (
            "a_new_run_never_takes_a_killed_runs_converged_flags_for_its_own",
            a_new_run_never_takes_a_killed_runs_converged_flags_for_its_own,
        ),
        (
            "a_misbehaving_relay_cannot_forge_states_host_keys_or_terminal_escapes",
            a_misbehaving_relay_cannot_forge_states_host_keys_or_terminal_escapes,
        ),
        (
            "no_caching_and_noop_apply_at_depth_2",
            no_caching_and_noop_apply_at_depth_2,
        ),
        (
            "noop_diff_shows_a_depth_2_leafs_diff_and_changes_nothing_then_diff_applies_it",
            noop_diff_shows_a_depth_2_leafs_diff_and_changes_nothing_then_diff_applies_it,
        ),
        (
            "staged_hosts_ignore_their_own_config_files_and_arbor_variables",
            staged_hosts_ignore_their_own_config_files_and_arbor_variables,
        ),
        (
            "live_edits_reach_a_depth_2_leaf_saved_in_place_and_by_rename",
            live_edits_reach_a_depth_2_leaf_saved_in_place_and_by_rename,
        ),
        (
            "a_killed_relay_fails_its_subtree_and_the_rest_converges",
            a_killed_relay_fails_its_subtree_and_the_rest_converges,
        ),
        (
            "leaf_host_keys_are_learned_at_depth_only_under_accept_new",
            leaf_host_keys_are_learned_at_depth_only_under_accept_new,
        ),
        ("a_bad_topology_exits_2", a_bad_topology_exits_2),
        (
            "json_output_is_one_event_per_line_in_order_at_every_depth",
            json_output_is_one_event_per_line_in_order_at_every_depth,
        ),
        (
            "quiet_reaches_hosts_at_depth_2",
            quiet_reaches_hosts_at_depth_2,
        ),
        (
            "a_permanent_cut_keeps_the_subtree_for_the_grace_period_then_tears_it_down",
            a_permanent_cut_keeps_the_subtree_for_the_grace_period_then_tears_it_down,
        ),
        (
            "an_outage_of_the_initiators_link_within_the_grace_period_is_ridden_out",
            an_outage_of_the_initiators_link_within_the_grace_period_is_ridden_out,
        ),
        (
            "an_outage_at_depth_within_the_grace_period_is_ridden_out",
            an_outage_at_depth_within_the_grace_period_is_ridden_out,
        ),
        (
            "ctrl_c_during_an_outage_does_not_wait_for_the_grace_period",
            ctrl_c_during_an_outage_does_not_wait_for_the_grace_period,
        ),
        (
            "when_the_initiators_address_changes_it_re_attaches_over_a_new_ssh_connection",
            when_the_initiators_address_changes_it_re_attaches_over_a_new_ssh_connection,
        ),
        (
            "when_the_ssh_connection_is_killed_the_parent_re_attaches_over_a_new_one",
            when_the_ssh_connection_is_killed_the_parent_re_attaches_over_a_new_one,
        ),
        (
            "when_the_initiators_address_changes_the_quic_link_migrates",
            when_the_initiators_address_changes_the_quic_link_migrates,
        ),
        (
            "when_the_ssh_connection_is_killed_the_quic_link_goes_on",
            when_the_ssh_connection_is_killed_the_quic_link_goes_on,
        ),
        (
            "on_quic_a_relay_logs_in_to_its_leaf_through_the_agent_on_its_link_without_its_ssh_connection",
            on_quic_a_relay_logs_in_to_its_leaf_through_the_agent_on_its_link_without_its_ssh_connection,
        ),
        (
            "when_udp_is_blocked_the_links_stay_on_ssh_and_converge",
            when_udp_is_blocked_the_links_stay_on_ssh_and_converge,
        ),
        (
            "a_topologys_quic_ports_are_where_each_child_listens_at_every_depth",
            a_topologys_quic_ports_are_where_each_child_listens_at_every_depth,
        ),
        (
            "the_congestion_control_chosen_runs_at_both_ends_of_every_link",
            the_congestion_control_chosen_runs_at_both_ends_of_every_link,
        ),
        (
            "after_a_re_attach_a_relay_re_attaches_to_its_leaf_through_the_new_agent",
            after_a_re_attach_a_relay_re_attaches_to_its_leaf_through_the_new_agent,
        ),
        (
            "a_wrong_re_attach_token_is_refused_and_the_socket_is_the_users_alone",
            a_wrong_re_attach_token_is_refused_and_the_socket_is_the_users_alone,
        ),
        (
            "compress_sends_the_binary_gzipped_once_per_relay",
            compress_sends_the_binary_gzipped_once_per_relay,
        ),
        (
            "a_kept_xz_stream_carries_the_binarys_first_copy_and_a_bad_one_falls_back_to_gzip",
            a_kept_xz_stream_carries_the_binarys_first_copy_and_a_bad_one_falls_back_to_gzip,
        ),
        (
            "a_topology_without_graphs_ends_once_every_host_runs",
            a_topology_without_graphs_ends_once_every_host_runs,
        ),
        (
            "artifacts_go_zstd_compressed_on_a_thin_link_and_plain_with_never",
            artifacts_go_zstd_compressed_on_a_thin_link_and_plain_with_never,
        ),
        (
            "a_one_percent_change_to_a_40_mib_artifact_crosses_the_link_as_a_patch",
            a_one_percent_change_to_a_40_mib_artifact_crosses_the_link_as_a_patch,
        ),
        (
            "a_relay_stages_its_leaves_and_passes_their_artifact_on_while_it_still_crosses_the_thin_link",
            a_relay_stages_its_leaves_and_passes_their_artifact_on_while_it_still_crosses_the_thin_link,
        ),
        (
            "a_relay_whose_disk_fills_while_an_artifact_arrives_fails_its_leaves_and_keeps_nothing",
            a_relay_whose_disk_fills_while_an_artifact_arrives_fails_its_leaves_and_keeps_nothing,
        ),
        (
            "a_second_build_rolls_out_over_the_first_as_a_patch",
            a_second_build_rolls_out_over_the_first_as_a_patch,
        ),
        (
            "a_source_file_reaches_every_leaf_through_its_relay_once_per_relay_on_the_link",
            a_source_file_reaches_every_leaf_through_its_relay_once_per_relay_on_the_link,
        ),
        (
            "a_corrupt_artifact_in_a_cache_is_detected_replaced_and_reported",
            a_corrupt_artifact_in_a_cache_is_detected_replaced_and_reported,
        ),
        (
            "a_small_cache_cap_evicts_the_older_artifact_and_build_at_depth_2",
            a_small_cache_cap_evicts_the_older_artifact_and_build_at_depth_2,
        ),
        (
            "a_relay_that_finds_its_artifact_corrupt_when_serving_fetches_it_again",
            a_relay_that_finds_its_artifact_corrupt_when_serving_fetches_it_again,
        ),
        (
            "a_live_edit_may_reuse_a_source_but_adding_one_asks_for_a_restart",
            a_live_edit_may_reuse_a_source_but_adding_one_asks_for_a_restart,
        ),
        (
            "under_no_caching_artifacts_go_into_working_dirs_and_leave_with_them",
            under_no_caching_artifacts_go_into_working_dirs_and_leave_with_them,
        ),
        (
            "on_a_terminal_a_live_view_shows_the_bar_host_stages_folded_hosts_and_the_summary",
            on_a_terminal_a_live_view_shows_the_bar_host_stages_folded_hosts_and_the_summary,
        ),
        (
            "an_encrypted_keys_passphrase_is_asked_once_per_run",
            an_encrypted_keys_passphrase_is_asked_once_per_run,
        ),
        (
            "a_second_run_says_every_binary_came_from_the_cache_and_counts_no_copy",
            a_second_run_says_every_binary_came_from_the_cache_and_counts_no_copy,
        ),
        (
            "a_local_process_on_a_tcp_fallback_host_cannot_use_the_store_tunnel",
            a_local_process_on_a_tcp_fallback_host_cannot_use_the_store_tunnel,
        ),
        (
            "a_timer_drives_an_exec_at_depth_2_through_a_relay",
            a_timer_drives_an_exec_at_depth_2_through_a_relay,
        ),
        (
            "a_kv_written_at_depth_2_is_read_by_another_host_that_cannot_overwrite_it",
            a_kv_written_at_depth_2_is_read_by_another_host_that_cannot_overwrite_it,
        ),
        (
            "a_user_and_group_made_at_depth_2_on_an_own_root_host_come_back_when_deleted",
            a_user_and_group_made_at_depth_2_on_an_own_root_host_come_back_when_deleted,
        ),
        (
            "the_host_name_is_set_at_depth_2_on_a_systemd_host_and_put_back_when_changed",
            the_host_name_is_set_at_depth_2_on_a_systemd_host_and_put_back_when_changed,
        ),
        (
            "without_systemd_the_host_name_is_written_and_set_by_arbor_at_depth_2",
            without_systemd_the_host_name_is_written_and_set_by_arbor_at_depth_2,
        ),
        (
            "an_unknown_user_field_exits_2_with_its_place",
            an_unknown_user_field_exits_2_with_its_place,
        ),
        (
            "a_package_from_a_local_repository_is_installed_at_depth_2_and_put_back_when_removed_by_hand",
            a_package_from_a_local_repository_is_installed_at_depth_2_and_put_back_when_removed_by_hand,
        ),
        (
            "a_source_deb_is_installed_at_depth_2_with_no_reachable_mirror_and_a_present_package_asks_apt_nothing",
            a_source_deb_is_installed_at_depth_2_with_no_reachable_mirror_and_a_present_package_asks_apt_nothing,
        ),
        (
            "a_service_shipped_as_a_file_runs_enabled_at_depth_2_and_is_restarted_within_a_second_when_stopped_by_hand",
            a_service_shipped_as_a_file_runs_enabled_at_depth_2_and_is_restarted_within_a_second_when_stopped_by_hand,
        ),
        (
            "a_source_directory_reaches_a_depth_2_leaf_drift_is_repaired_and_purge_removes_extras",
            a_source_directory_reaches_a_depth_2_leaf_drift_is_repaired_and_purge_removes_extras,
        ),
        (
            "a_tree_of_identical_files_crosses_the_initiators_link_about_once",
            a_tree_of_identical_files_crosses_the_initiators_link_about_once,
        ),
        (
            "an_exported_files_source_is_published_by_its_host_and_collected_across_relays",
            an_exported_files_source_is_published_by_its_host_and_collected_across_relays,
        ),
    ];
    // l2-3 (under the dropbear relay r2) boots systemd on a root of its own: the pkg and svc
    // tests install packages and start services there, never on the machine.
    support::harness::run_with_lab(
        "tree",
        &[
            "--relays",
            "2",
            "--leaves",
            "3",
            "--dropbear",
            "r2,l1-2",
            "--init",
            SYSTEM_HOST,
        ],
        true,
        tests,
    )
}

/// A topology file in a temp dir; `{leaf}` in `body` becomes the leaf graph's path.
struct Topo {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn topology(body: &str) -> Topo {
    let dir = tempfile::tempdir().expect("tempdir");
    let leaf = support::repo_root().join("examples/leaf.yaml");
    let path = dir.path().join("topology.yaml");
    std::fs::write(&path, body.replace("{leaf}", &leaf.to_string_lossy())).expect("write");
    Topo { _dir: dir, path }
}

const TWO_RELAYS: &str = "\
defaults:
  user: root
hosts:
- host: 10.199.0.11
  name: r1
  children:
  - host: 10.199.1.1[1-3]
    name: l1-[1-3]
    graph: {leaf}
- host: 10.199.0.12
  name: r2
  children:
  - host: 10.199.2.1[1-3]
    name: l2-[1-3]
    graph: {leaf}
";

fn arbor_command(lab: &Lab, home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", lab.init_ns(), ARBOR, "run"])
        .args(args)
        .env("HOME", home)
        .env_remove("SSH_AUTH_SOCK")
        .env("ARBOR_LOG", "arbor=info");
    c
}

fn run(lab: &Lab, topo: &Topo, extra: &[&str]) -> Output {
    let mut args = vec![
        "--topology",
        topo.path.to_str().unwrap_or_default(),
        "--tmp-prefix",
    ];
    args.extend_from_slice(extra);
    arbor_command(lab, &lab.home(), &args)
        .output()
        .expect("run arbor")
}

fn clean(lab: &Lab, caches: bool) {
    for h in HOSTS {
        let extra = if caches { " /root/.cache/arbor" } else { "" };
        lab.sh(
            h,
            &format!("rm -rf /tmp/from-* /tmp/arbor.* /tmp/escaped /root/escaped{extra}"),
        );
    }
}

fn leftovers(lab: &Lab, host: &str) -> String {
    lab.sh(
        host,
        "pgrep -x -a arbor || true; ls -d /tmp/arbor.* 2>/dev/null || true",
    )
}

fn check_no_leftovers(lab: &Lab, hosts: &[&str]) -> TestResult {
    // Leaves whose relay vanished notice their link is gone and clean up on their own.
    let deadline = Instant::now() + Duration::from_secs(8);
    for h in hosts {
        loop {
            let left = leftovers(lab, h);
            if left.trim().is_empty() {
                break;
            }
            check!(
                Instant::now() < deadline,
                "{h} has leftovers: {left}\nits logs there:\n{}",
                lab.sh(h, "tail -n 25 /tmp/arbor.*/arbor.log 2>/dev/null; true")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// The collected files on a leaf: sorted "name: content" lines.
fn collected(lab: &Lab, leaf: &str) -> String {
    lab.sh(
        leaf,
        "for f in /tmp/from-*; do [ -f \"$f\" ] && printf '%s: %s' \"$(basename $f)\" \"$(cat $f)\" && echo; done | sort",
    )
}

/// The run exited 0 and every leaf holds all six leaves' files; returns the run's output.
fn exchanged(lab: &Lab, out: &Output) -> Result<String, libtest_mimic::Failed> {
    let log = exited(out, 0)?;
    let want = expect_collected(&LEAVES);
    for leaf in LEAVES {
        let got = collected(lab, leaf);
        check!(
            got == want,
            "{leaf} collected:\n{got}\nwant:\n{want}\n{log}"
        );
    }
    Ok(log)
}

fn expect_collected(names: &[&str]) -> String {
    let mut v: Vec<String> = names
        .iter()
        .map(|n| format!("from-{n}: hello from {n}\n"))
        .collect();
    v.sort();
    v.concat()
}

fn leaves_exchange_files_through_relays_with_one_binary_per_relay_on_the_link(
    lab: &Lab,
) -> TestResult {
    clean(lab, true);
    for r in ["r1", "r2"] {
        let keys = lab.sh(r, "ls /root/.ssh/id_* 2>/dev/null || true");
        check!(keys.trim().is_empty(), "{r} holds a private key: {keys}");
    }
    let topo = topology(TWO_RELAYS);
    let binary = std::fs::metadata(ARBOR).map_err(fail)?.len();
    let (tx0, rx0) = lab.init_link_bytes();
    let out = run(lab, &topo, &["--converged-timeout", "2"]);
    let (tx1, rx1) = lab.init_link_bytes();
    let log = exchanged(lab, &out)?;
    // Events from depth 2 arrive tagged with their path.
    check!(
        log.contains("r1/l1-2 | "),
        "no output tagged r1/l1-2\n{log}"
    );
    let sent = tx1 - tx0;
    let limit = 2 * binary + 2 * binary / 10;
    check!(
        sent <= limit,
        "the initiator's link carried {sent} bytes out (and {} in); two relays x {binary}-byte \
         binary + 10% is {limit}",
        rx1 - rx0
    );
    check_no_leftovers(lab, &HOSTS)
}

/// Once the two relays' six leaves have converged, the initiator's store holds leases and
/// watches by relay, not by leaf: each relay's front holds one shared lease and one shared
/// watch for its whole subtree (the relays run no graph of their own here): 2 leases, and 3
/// watches with the initiator's own on the converged flags, where a lease and a watch per
/// leaf would be 6 and 7.
fn the_initiators_store_holds_a_lease_and_a_watch_per_relay_not_per_leaf(lab: &Lab) -> TestResult {
    clean(lab, false);
    let topo = topology(TWO_RELAYS);
    let (mut running, rx) = start(lab, &topo, &[]);
    let converged: Vec<String> = LEAVES
        .iter()
        .map(|l| format!("r{}/{l}: converged", &l[1..2]))
        .collect();
    wait_lines(&rx, &converged, Duration::from_secs(90))?;
    let metrics = support::store_socket(running.0.id())
        .and_then(|s| support::scrape(&s))
        .ok_or_else(|| fail("could not read the initiator's store /metrics"))?;
    let leases = support::gauge(&metrics, "arbor_store_leases");
    let watchers = support::gauge(&metrics, "etcd_debugging_mvcc_watcher_total");
    stop_with(&mut running, libc::SIGINT)?;
    check!(
        leases == 2.0,
        "the initiator's store holds {leases} leases for 2 relays and 6 leaves; want 2 (one \
         per relay)"
    );
    check!(
        watchers == 3.0,
        "the initiator's store holds {watchers} watchers for 2 relays and 6 leaves; want 3 \
         (one per relay, and the initiator's own)"
    );
    check_no_leftovers(lab, &HOSTS)
}

/// The (level, message) of each log line a host sent up, from a run's text output
/// (`<timestamp> <host> | <LEVEL> <message>`).
fn host_logs<'a>(log: &'a str, host: &str) -> Vec<(&'a str, &'a str)> {
    let tag = format!("{host} | ");
    log.lines()
        .filter(|l| is_timestamped(l))
        .filter_map(|l| l[25..].strip_prefix(tag.as_str()))
        .filter_map(|rest| rest.trim_start().split_once(' '))
        .collect()
}

/// In the all-to-all exchange of 6 leaves, each leaf collects 6 files. At info level a leaf
/// logs summaries, not a line per file: no more summaries than times it converged (plus one
/// as it leaves), and together they account for all 6 files it created. With -v each file's
/// line is there.
fn collected_files_are_summarized_per_host_at_info_and_listed_one_by_one_under_v(
    lab: &Lab,
) -> TestResult {
    let topo = topology(TWO_RELAYS);
    clean(lab, false);
    let out = run(lab, &topo, &["--converged-timeout", "2"]);
    let log = exchanged(lab, &out)?;
    for (relay, leaf) in LEAVES.iter().map(|l| (&l[1..2], *l)) {
        let host = format!("r{relay}/{leaf}");
        let lines = host_logs(&log, &host);
        let per_file: Vec<_> = lines
            .iter()
            .filter(|(_, m)| m.starts_with("file[@@"))
            .collect();
        check!(
            per_file.is_empty(),
            "{host} logged a line per collected file at info: {per_file:?}\n{log}"
        );
        let summaries: Vec<&str> = lines
            .iter()
            .filter(|(level, m)| *level == "INFO" && m.starts_with("collected "))
            .map(|(_, m)| *m)
            .collect();
        let converged = log
            .lines()
            .filter(|l| l.ends_with(&format!(" {host}: converged")))
            .count();
        // One when it settles after news (each time it then says converged), and at most one
        // more as it leaves.
        check!(
            !summaries.is_empty() && summaries.len() <= converged + 1,
            "{host}: {} summaries for {converged} convergences: {summaries:#?}\n{log}",
            summaries.len()
        );
        check!(
            summaries
                .last()
                .is_some_and(|s| s.starts_with("collected 6 file resources")),
            "{host}'s last summary: {summaries:#?}"
        );
        // Every file it created is in a summary: named (up to 3) or counted.
        let accounted: usize = summaries
            .iter()
            .map(|s| match s.split_once(" changed on this host") {
                Some((head, _)) => head
                    .rsplit("; ")
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0),
                None => s.matches(": created /tmp/from-").count(),
            })
            .sum();
        check!(
            accounted == 6,
            "{host}'s summaries account for {accounted} created files, not 6: {summaries:#?}"
        );
    }

    clean(lab, false);
    let out = run(lab, &topo, &["--converged-timeout", "2", "-v"]);
    let log = exchanged(lab, &out)?;
    for (relay, leaf) in LEAVES.iter().map(|l| (&l[1..2], *l)) {
        let host = format!("r{relay}/{leaf}");
        let lines = host_logs(&log, &host);
        for from in LEAVES {
            let want = format!("file[@@{from}/from-{from}]: created /tmp/from-{from}");
            check!(
                lines
                    .iter()
                    .any(|(level, m)| *level == "DEBUG" && *m == want),
                "{host} did not log {want:?} under -v\n{log}"
            );
        }
    }
    Ok(())
}

fn relays_with_keys_of_their_own_still_sign_for_their_leaves(lab: &Lab) -> TestResult {
    clean(lab, false);
    // Each relay gets a key of its own that its leaves do not accept: the relay tries it
    // (after the forwarded agent), and the run must still reach every leaf.
    for r in ["r1", "r2"] {
        lab.sh(r, "ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/id_ed25519");
    }
    let topo = topology(TWO_RELAYS);
    let out = run(lab, &topo, &["--converged-timeout", "2"]);
    for r in ["r1", "r2"] {
        lab.sh(r, "rm -f /root/.ssh/id_ed25519 /root/.ssh/id_ed25519.pub");
    }
    exchanged(lab, &out)?;
    check_no_leftovers(lab, &HOSTS)
}

fn a_relay_under_a_relay_works_at_depth_3(lab: &Lab) -> TestResult {
    clean(lab, false);
    // r1 reaches itself again over its rack address: a relay at depth 2 whose leaves are at 3.
    let topo = topology(
        "\
defaults:
  user: root
hosts:
- host: 10.199.0.11
  name: r1
  children:
  - host: 10.199.1.1
    name: r1-inner
    children:
    - host: 10.199.1.1[1-3]
      name: l1-[1-3]
      graph: {leaf}
",
    );
    let out = run(lab, &topo, &["--converged-timeout", "2"]);
    let log = exited(&out, 0)?;
    check!(
        log.contains("r1/r1-inner/l1-3 | "),
        "no output tagged with the depth-3 path\n{log}"
    );
    let want = expect_collected(&["l1-1", "l1-2", "l1-3"]);
    for leaf in ["l1-1", "l1-2", "l1-3"] {
        let got = collected(lab, leaf);
        check!(got == want, "{leaf} collected:\n{got}\n{log}");
    }
    check_no_leftovers(lab, &HOSTS)
}

fn jump_hosts_give_the_same_result(lab: &Lab) -> TestResult {
    clean(lab, false);
    let topo = topology(&TWO_RELAYS.replace("  name: r1\n", "  name: r1\n  mode: jump\n"));
    let out = run(lab, &topo, &["--converged-timeout", "2"]);
    exchanged(lab, &out)?;
    check_no_leftovers(lab, &HOSTS)
}

/// Removes a file when dropped: a test's setup that must not outlive it, on failure too.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs arbor at the debug level, which says how each copy of the binary went: each relay
/// got `packed` (`arbor.xz`, `arbor.gz`), its first 512 KiB sent as its probe's bytes (the
/// copy sent only the rest). Returns the bytes out on the initiator's link.
fn relays_got_the_binary_after_the_probes_head(
    lab: &Lab,
    topo: &Topo,
    extra: &[&str],
    packed: &str,
) -> Result<u64, libtest_mimic::Failed> {
    let mut args = vec![
        "--topology",
        topo.path.to_str().unwrap_or_default(),
        "--tmp-prefix",
    ];
    args.extend_from_slice(extra);
    let (tx0, _) = lab.init_link_bytes();
    let out = arbor_command(lab, &lab.home(), &args)
        .env("ARBOR_LOG", "arbor=debug")
        .output()
        .map_err(fail)?;
    let (tx1, _) = lab.init_link_bytes();
    let log = exchanged(lab, &out)?;
    for relay in ["r1", "r2"] {
        for line in [
            format!("{relay}: copied {packed}"),
            format!("{relay}: {packed}: its first 524288 bytes came with the probe"),
        ] {
            check!(log.contains(&line), "no line {line:?}\n{log}");
        }
    }
    Ok(tx1 - tx0)
}

/// Where the initiator keeps an xz stream of its build (`arbor.xz` beside its cached copy),
/// the binary's first copy to a host that has xz is that stream, relays keep it to pass on,
/// and each host checks the sha256 of what it unpacks. The probe's bytes were its first
/// 512 KiB, which the host kept, so the copy sends the rest. A kept stream that unpacks to
/// other bytes is refused on the host, removed at the initiator, and the copy goes gzipped.
/// (arbor makes the stream itself only for builds up to 64 MiB, never for this 100 MB debug
/// build: the test makes it. `--compress always`: a packed copy on the unshaped link, which
/// `auto` may rightly read as a LAN.)
fn a_kept_xz_stream_carries_the_binarys_first_copy_and_a_bad_one_falls_back_to_gzip(
    lab: &Lab,
) -> TestResult {
    clean(lab, true);
    let topo = topology(TWO_RELAYS);
    let sha = |out: &str| {
        out.split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let local_sha = sha(&String::from_utf8_lossy(
        &Command::new("sha256sum")
            .arg(ARBOR)
            .output()
            .map_err(fail)?
            .stdout,
    ));
    let dir = lab.home().join(".cache/arbor/bin").join(&local_sha);
    std::fs::create_dir_all(&dir).map_err(fail)?;
    let kept = RemoveOnDrop(dir.join("arbor.xz"));
    // xz -0: seconds for the debug build, where arbor would use preset 6.
    let xz = |from: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("xz -0 -T2 -c '{from}' > '{}'", kept.0.display()))
            .status()
    };
    check!(xz(ARBOR).map_err(fail)?.success(), "xz of the build");
    let xz_size = std::fs::metadata(&kept.0).map_err(fail)?.len();

    let always = ["--converged-timeout", "2", "--compress", "always"];
    let sent = relays_got_the_binary_after_the_probes_head(lab, &topo, &always, "arbor.xz")?;
    let limit = 2 * xz_size + 2 * xz_size * 15 / 100;
    check!(
        sent <= limit,
        "the initiator's link carried {sent} bytes out; two relays x {xz_size} bytes + 15% is \
         {limit}"
    );
    for host in HOSTS {
        let cached = lab.sh(host, "ls -a /root/.cache/arbor/bin/*/ 2>/dev/null || true");
        // A relay keeps the stream to pass on to children on thin links; a leaf does not.
        let relay = host.starts_with('r');
        check!(
            cached.contains("arbor.xz") == relay
                && !cached.contains(".arbor.unpack")
                && !cached.contains(".arbor.xz."),
            "{host}: the cache holds {cached:?} (a relay keeps arbor.xz, a leaf does not, and \
             no temp file is left)"
        );
        let got = sha(&lab.sh(
            host,
            &format!("sha256sum /root/.cache/arbor/bin/{local_sha}/arbor || true"),
        ));
        check!(got == local_sha, "{host}: cached arbor has sha256 {got:?}");
    }
    check_no_leftovers(lab, &HOSTS)?;

    // A kept stream of other bytes of the same size (one byte changed): refused on the host
    // by its sha256, removed here, and the binary goes gzipped.
    clean(lab, true);
    let other = lab.dir().join("arbor-other");
    let _other = RemoveOnDrop(other.clone());
    std::fs::copy(ARBOR, &other).map_err(fail)?;
    let changed = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf 'X' | dd of='{}' bs=1 seek=4096 conv=notrunc status=none",
            other.display()
        ))
        .status()
        .map_err(fail)?;
    check!(changed.success(), "changing a byte");
    check!(
        xz(&other.display().to_string()).map_err(fail)?.success(),
        "xz"
    );
    let out = run(lab, &topo, &always);
    let log = exchanged(lab, &out)?;
    check!(
        log.contains("the binary's xz copy failed, copying it gzipped")
            && log.contains("xz -d failed or gave the wrong bytes"),
        "no warning naming the failed xz copy\n{log}"
    );
    check!(
        log.contains("r1: copied arbor.gz") || log.contains("r2: copied arbor.gz"),
        "no gzipped copy after the refused xz one\n{log}"
    );
    check!(!kept.0.exists(), "the bad kept stream was not removed");
    for host in HOSTS {
        let got = sha(&lab.sh(
            host,
            &format!("sha256sum /root/.cache/arbor/bin/{local_sha}/arbor || true"),
        ));
        check!(got == local_sha, "{host}: cached arbor has sha256 {got:?}");
    }
    check_no_leftovers(lab, &HOSTS)
}

/// With --compress, the initiator's link carries two gzipped binaries, relays keep theirs to
/// pass on without recompressing, and every leaf ends up with the exact binary. Then again
/// with the gzip stream the first run kept at the initiator: each relay's probe was its
/// first 512 KiB, which the copy does not send again.
fn compress_sends_the_binary_gzipped_once_per_relay(lab: &Lab) -> TestResult {
    clean(lab, true);
    let topo = topology(TWO_RELAYS);
    let sha_of = |out: &[u8]| {
        String::from_utf8_lossy(out)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let local_sha = sha_of(
        &Command::new("sha256sum")
            .arg(ARBOR)
            .output()
            .map_err(fail)?
            .stdout,
    );
    // What gzip -6 makes of the binary: the reference for the bytes on the link.
    let gz = Command::new("sh")
        .args(["-c", &format!("gzip -6 -c '{ARBOR}' | wc -c")])
        .output()
        .map_err(fail)?;
    let gz: u64 = String::from_utf8_lossy(&gz.stdout)
        .trim()
        .parse()
        .map_err(fail)?;
    let binary = std::fs::metadata(ARBOR).map_err(fail)?.len();

    let (tx0, _) = lab.init_link_bytes();
    let out = run(lab, &topo, &["--converged-timeout", "2", "--compress"]);
    let (tx1, _) = lab.init_link_bytes();
    let log = exchanged(lab, &out)?;
    for line in ["r1: copied arbor.gz", "r2/l2-3: copied arbor.gz"] {
        check!(log.contains(line), "no line {line:?}\n{log}");
    }
    let sent = tx1 - tx0;
    let limit = 2 * gz + 2 * gz * 15 / 100;
    check!(
        sent <= limit,
        "the initiator's link carried {sent} bytes out; two relays x {gz} bytes (gzip -6 of \
         the {binary}-byte binary) + 15% is {limit}"
    );
    for (host, keeps) in [("r1", true), ("r2", true), ("l1-1", false), ("l2-3", false)] {
        let dir = lab.sh(host, "ls -d /root/.cache/arbor/bin/*/ 2>/dev/null || true");
        let dir = dir.trim();
        check!(!dir.is_empty(), "{host}: no cache entry");
        let sha = sha_of(lab.sh(host, &format!("sha256sum {dir}arbor")).as_bytes());
        check!(
            sha == local_sha,
            "{host}: cached arbor has sha256 {sha}, want {local_sha}"
        );
        let kept = lab.sh(host, &format!("ls -a {dir}"));
        check!(
            kept.contains("arbor.gz") == keeps,
            "{host}: cache dir holds {kept:?} (a relay keeps arbor.gz, a leaf does not)"
        );
        check!(
            !kept.contains(".arbor.unpack"),
            "{host}: an unpacking temp file was left: {kept:?}"
        );
    }
    check_no_leftovers(lab, &HOSTS)?;

    // The kept stream's head goes with the probe.
    clean(lab, true);
    let sent = relays_got_the_binary_after_the_probes_head(
        lab,
        &topo,
        &["--converged-timeout", "2", "--compress"],
        "arbor.gz",
    )?;
    check!(
        sent <= limit,
        "the second run: the initiator's link carried {sent} bytes out, over {limit}"
    );
    for host in ["r1", "r2", "l1-1", "l2-3"] {
        let sha = sha_of(
            lab.sh(host, "sha256sum /root/.cache/arbor/bin/*/arbor")
                .as_bytes(),
        );
        check!(
            sha == local_sha,
            "second run, {host}: cached arbor has sha256 {sha}, want {local_sha}"
        );
    }
    check_no_leftovers(lab, &HOSTS)
}

/// Hosts with nothing to apply are converged as soon as they run: --converged-timeout ends
/// the run (it used to wait for a convergence flag that no host would ever write).
fn a_topology_without_graphs_ends_once_every_host_runs(lab: &Lab) -> TestResult {
    clean(lab, false);
    let topo = topology(&TWO_RELAYS.replace("    graph: {leaf}\n", ""));
    let started = Instant::now();
    let mut command = arbor_command(
        lab,
        &lab.home(),
        &[
            "--topology",
            topo.path.to_str().unwrap_or_default(),
            "--tmp-prefix",
            "--converged-timeout",
            "1",
        ],
    );
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run arbor");
    let deadline = started + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if child.try_wait().expect("wait").is_none() {
        let _ = child.kill();
        let out = child.wait_with_output().expect("output");
        return Err(fail(format!(
            "still running after 60 s with --converged-timeout 1\n{}",
            text(&out)
        )));
    }
    let out = child.wait_with_output().expect("output");
    let log = exited(&out, 0)?;
    check!(
        log.contains("r2/l2-3: running"),
        "a leaf never reported running\n{log}"
    );
    // Not a terminal: plain lines, each one timestamped, until the summary's blank line.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let events: Vec<&str> = stdout.lines().take_while(|l| !l.is_empty()).collect();
    check!(
        events.len() >= 8 && events.iter().all(|l| is_timestamped(l)) && !stdout.contains('\x1b'),
        "stdout is not plain timestamped lines:\n{stdout}"
    );
    check!(
        collected(lab, "l1-1").is_empty(),
        "a leaf without a graph wrote files"
    );
    check_no_leftovers(lab, &HOSTS)
}

fn start(lab: &Lab, topo: &Topo, extra: &[&str]) -> (Running, mpsc::Receiver<String>) {
    start_with(lab, topo, extra, false)
}

/// [`start`], with stderr's lines (the initiator's log) in the same channel as stdout's.
fn start_logging(lab: &Lab, topo: &Topo, extra: &[&str]) -> (Running, mpsc::Receiver<String>) {
    start_with(lab, topo, extra, true)
}

fn start_with(
    lab: &Lab,
    topo: &Topo,
    extra: &[&str],
    with_stderr: bool,
) -> (Running, mpsc::Receiver<String>) {
    let mut args = vec![
        "--topology",
        topo.path.to_str().unwrap_or_default(),
        "--tmp-prefix",
    ];
    args.extend_from_slice(extra);
    let mut child = arbor_command(lab, &lab.home(), &args)
        .stdout(Stdio::piped())
        .stderr(if with_stderr {
            Stdio::piped()
        } else {
            Stdio::inherit()
        })
        .spawn()
        .expect("start arbor");
    let out = child.stdout.take().expect("stdout");
    let rx = match child.stderr.take() {
        Some(err) => lines_of_both(out, err),
        None => lines_of(out),
    };
    (Running(child), rx)
}

fn ctrl_c_tears_down_every_depth(lab: &Lab) -> TestResult {
    signal_tears_down_every_depth(lab, libc::SIGINT, 130)
}

fn sigterm_tears_down_every_depth_with_the_summary_and_exit_143(lab: &Lab) -> TestResult {
    signal_tears_down_every_depth(lab, libc::SIGTERM, 143)
}

/// Runs the two-relay tree until every leaf converged, sends `signal`, and checks the exit
/// code, the summary and that nothing is left on any host.
fn signal_tears_down_every_depth(lab: &Lab, signal: i32, code: i32) -> TestResult {
    clean(lab, false);
    let topo = topology(TWO_RELAYS);
    let (mut running, rx) = start(lab, &topo, &[]);
    let converged: Vec<String> = [
        "r1/l1-1", "r1/l1-2", "r1/l1-3", "r2/l2-1", "r2/l2-2", "r2/l2-3",
    ]
    .iter()
    .map(|p| format!("{p}: converged"))
    .collect();
    wait_lines(&rx, &converged, Duration::from_secs(90))?;
    for h in HOSTS {
        let n = lab.sh(h, "pgrep -x -c arbor || true");
        check!(n.trim() != "0", "{h}: no arbor running during the run");
    }
    let started = Instant::now();
    let status = stop_with(&mut running, signal)?;
    let took = started.elapsed();
    check!(
        status.code() == Some(code),
        "exit {:?} after signal {signal}, want {code}",
        status.code()
    );
    check!(
        took < Duration::from_secs(6),
        "took {took:?} to stop the tree"
    );
    let rest: Vec<String> = rx.try_iter().collect();
    check!(
        rest.iter()
            .any(|l| l.starts_with("HOST") && l.contains("RESULT"))
            && rest
                .iter()
                .any(|l| l.starts_with("r1 ") && l.contains(" ok ")),
        "no summary after signal {signal}:\n{}",
        rest.join("\n")
    );
    for h in HOSTS {
        let left = leftovers(lab, h);
        check!(
            left.trim().is_empty(),
            "{h} has leftovers right after exit: {left}"
        );
    }
    Ok(())
}

fn a_second_signal_during_teardown_exits_at_once_naming_the_hosts_left(lab: &Lab) -> TestResult {
    clean(lab, false);
    let topo = topology(TWO_RELAYS);
    let (mut running, rx) = start_logging(lab, &topo, &[]);
    let converged: Vec<String> = LEAVES.iter().map(|l| format!("/{l}: converged")).collect();
    wait_lines(&rx, &converged, Duration::from_secs(90))?;
    // A leaf that cannot answer: the teardown waits for it (the grace period, then its
    // relay's own deadline), so a second signal lands while it is under way.
    lab.sh("l1-1", "pkill -STOP -x arbor");
    let _resume = Undo {
        lab,
        host: "l1-1",
        shell: "pkill -CONT -x arbor".into(),
    };
    unsafe {
        libc::kill(running.0.id() as i32, libc::SIGINT);
    }
    std::thread::sleep(Duration::from_millis(700));
    check!(
        running.0.try_wait().map_err(fail)?.is_none(),
        "the teardown ended before the second signal; nothing to force"
    );
    let second = Instant::now();
    let status = stop_with(&mut running, libc::SIGTERM)?;
    let took = second.elapsed();
    check!(
        took < Duration::from_secs(1),
        "exit took {took:?} after the second signal"
    );
    check!(status.code() == Some(130), "exit {:?}", status.code());
    let mut rest = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
        rest.push(line);
    }
    let named = rest
        .iter()
        .find(|l| l.contains("may still hold a working dir"))
        .cloned()
        .unwrap_or_default();
    check!(
        named.contains("l1-1") && named.contains("r1"),
        "the hosts that may hold state were not named:\n{}",
        rest.join("\n")
    );
    // Once resumed, the stopped leaf finds its link gone; its relay, stuck waiting for it,
    // ends through its own hard deadline: every working dir still goes.
    lab.sh("l1-1", "pkill -CONT -x arbor");
    check_no_leftovers(lab, &HOSTS)
}

/// Sends `signal` to a running arbor and waits (at most 15 s) for its exit.
fn stop_with(
    running: &mut Running,
    signal: i32,
) -> Result<std::process::ExitStatus, libtest_mimic::Failed> {
    let started = Instant::now();
    // `ip netns exec` execs arbor, so the child's pid is arbor's.
    unsafe {
        libc::kill(running.0.id() as i32, signal);
    }
    loop {
        if let Some(s) = running.0.try_wait().map_err(fail)? {
            return Ok(s);
        }
        check!(
            started.elapsed() < Duration::from_secs(15),
            "no exit within 15 s of signal {signal}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Undoes a change to a lab host (or `init`) however the test ends.
struct Undo<'a> {
    lab: &'a Lab,
    host: &'a str,
    shell: String,
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        let _ = self.lab.exec(self.host, &self.shell);
    }
}

fn ctrl_c_during_staging_leaves_no_working_dir_or_partial_cache_file(lab: &Lab) -> TestResult {
    clean(lab, true);
    // A thin link, so ^C lands while the relays' copies of arbor are in flight.
    let dev = lab.get("LAB_INIT_IF").to_string();
    lab.sh(
        "init",
        &format!("tc qdisc replace dev {dev} root tbf rate 20mbit burst 64kb latency 500ms"),
    );
    let _unshape = Undo {
        lab,
        host: "init",
        shell: format!("tc qdisc del dev {dev} root"),
    };
    let topo = topology(TWO_RELAYS);
    let (mut running, rx) = start(lab, &topo, &[]);
    wait_lines(
        &rx,
        &["r1: copy".to_string(), "r2: copy".to_string()],
        Duration::from_secs(30),
    )?;
    // Wait until both relays have a copy in flight: plain (`.arbor.arbor-*`, sftp) or, as
    // the default compresses on a thin link, gzipped and unpacked as it arrives
    // (`.arbor.unpack.*`, after the initiator has gzipped the build).
    let deadline = Instant::now() + Duration::from_secs(30);
    for r in ["r1", "r2"] {
        loop {
            let partial = lab.sh(
                r,
                "find /root/.cache/arbor -name '.arbor.arbor-*' -o -name '.arbor.unpack.*' \
                 2>/dev/null || true",
            );
            if !partial.trim().is_empty() {
                break;
            }
            check!(
                Instant::now() < deadline,
                "{r}: no copy in flight 30 s after staging began"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let status = stop_with(&mut running, libc::SIGINT)?;
    check!(
        status.code() == Some(130),
        "exit {:?} after ^C",
        status.code()
    );
    for r in ["r1", "r2"] {
        let left = lab.sh(
            r,
            "ls -d /tmp/arbor.* 2>/dev/null; find /root/.cache/arbor -name '.*arbor-*' \
             -o -name '.arbor.unpack.*' -o -name '.arbor.gz.*' 2>/dev/null; \
             ls /root/.cache/arbor/bin/*/arbor 2>/dev/null; pgrep -x -a arbor; true",
        );
        check!(
            left.trim().is_empty(),
            "{r} holds a working dir, a partial or unfinished cache entry, or a process after ^C \
             during staging:\n{left}"
        );
    }
    Ok(())
}

/// Makes `host` report `platform` to `uname -sm` (through a login PATH from
/// ~/.ssh/environment) until dropped.
fn pretend_platform<'a>(lab: &'a Lab, host: &'a str, platform: &str) -> Undo<'a> {
    lab.sh(
        host,
        &format!(
            "mkdir -p /root/shim /root/.ssh && \
             printf '#!/bin/sh\\nif [ \"$*\" = -sm ]; then echo \"{platform}\"; else exec /usr/bin/uname \"$@\"; fi\\n' \
               > /root/shim/uname && chmod 755 /root/shim/uname && \
             echo PATH=/root/shim:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
               > /root/.ssh/environment"
        ),
    );
    Undo {
        lab,
        host,
        shell: "rm -rf /root/shim /root/.ssh/environment".into(),
    }
}

/// The sha256 directories in a host's binary cache.
fn cached_builds(lab: &Lab, host: &str) -> Vec<String> {
    let out = lab.sh(host, "ls /root/.cache/arbor/bin 2>/dev/null || true");
    let mut v: Vec<String> = out.split_whitespace().map(str::to_string).collect();
    v.sort();
    v
}

fn sha256_of(path: &Path) -> Result<String, libtest_mimic::Failed> {
    let out = Command::new("sha256sum").arg(path).output().map_err(fail)?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

fn a_leaf_of_another_platform_gets_its_build_once_through_its_relay(lab: &Lab) -> TestResult {
    clean(lab, true);
    let _shim = pretend_platform(lab, "l1-1", "Linux aarch64");
    let topo = topology(TWO_RELAYS);

    // Without a build for it, only that leaf fails, naming its platform and the flag.
    let out = run(lab, &topo, &["--converged-timeout", "2"]);
    let log = exited(&out, 1)?;
    check!(
        log.lines().any(|l| l.contains("r1/l1-1: FAILED")
            && l.contains("Linux aarch64")
            && l.contains("--binary")),
        "no failure naming the platform and --binary\n{log}"
    );
    let got = collected(lab, "l2-3");
    check!(
        got == expect_collected(&["l1-2", "l1-3", "l2-1", "l2-2", "l2-3"]),
        "the other leaves did not converge: l2-3 collected\n{got}\n{log}"
    );
    // The refused leaf keeps nothing: no working dir, no cache entry made ready by the probe.
    check!(
        cached_builds(lab, "l1-1").is_empty(),
        "l1-1 keeps cache entries {:?} after being refused",
        cached_builds(lab, "l1-1")
    );
    check_no_leftovers(lab, &["l1-1"])?;

    // A second build: the same program with other bytes (so another sha256).
    let dir = tempfile::tempdir().map_err(fail)?;
    let other = dir.path().join("arbor-aarch64");
    let mut bytes = std::fs::read(ARBOR).map_err(fail)?;
    bytes.extend_from_slice(b"\narbor test build for aarch64\n");
    std::fs::write(&other, &bytes).map_err(fail)?;
    let (own_sha, other_sha) = (sha256_of(Path::new(ARBOR))?, sha256_of(&other)?);
    clean(lab, true);
    let (tx0, _) = lab.init_link_bytes();
    let flag = format!("aarch64={}", other.display());
    let out = run(lab, &topo, &["--converged-timeout", "2", "--binary", &flag]);
    let (tx1, _) = lab.init_link_bytes();
    let log = exchanged(lab, &out)?;
    check!(
        cached_builds(lab, "l1-1") == vec![other_sha.clone()],
        "l1-1 caches {:?}, want only the aarch64 build {other_sha}\n{log}",
        cached_builds(lab, "l1-1")
    );
    let mut both = vec![own_sha.clone(), other_sha.clone()];
    both.sort();
    check!(
        cached_builds(lab, "r1") == both,
        "r1 caches {:?}, want its own and the aarch64 build",
        cached_builds(lab, "r1")
    );
    for h in ["r2", "l1-2", "l2-1"] {
        check!(
            cached_builds(lab, h) == vec![own_sha.clone()],
            "{h} caches {:?}, want only {own_sha}",
            cached_builds(lab, h)
        );
    }
    // Each relay's binary, and the aarch64 build once (to r1 only).
    let binary = bytes.len() as u64;
    let budget = 3 * binary + binary / 10;
    check!(
        tx1 - tx0 <= budget,
        "{} bytes left the initiator, more than 3 builds + 10% ({budget})",
        tx1 - tx0
    );
    Ok(())
}

fn a_child_that_never_says_hello_fails_after_the_hello_timeout_and_is_stopped(
    lab: &Lab,
) -> TestResult {
    clean(lab, false);
    let _shim = pretend_platform(lab, "l1-1", "Linux aarch64");
    let dir = tempfile::tempdir().map_err(fail)?;
    let silent = dir.path().join("silent");
    std::fs::write(&silent, "#!/bin/sh\nwhile :; do sleep 1; done\n").map_err(fail)?;
    let topo = topology(
        "defaults:\n  user: root\nhosts:\n- host: 10.199.0.11\n  name: r1\n  children:\n  - host: 10.199.1.11\n    name: l1-1\n    graph: {leaf}\n",
    );
    let flag = format!("aarch64={}", silent.display());
    let started = Instant::now();
    let out = run(
        lab,
        &topo,
        &[
            "--converged-timeout",
            "1",
            "--connect-timeout",
            "2",
            "--binary",
            &flag,
        ],
    );
    let log = exited(&out, 1)?;
    check!(
        log.lines()
            .any(|l| l.contains("r1/l1-1: FAILED") && l.contains("did not answer within 10s")),
        "no hello-timeout failure for l1-1\n{log}"
    );
    check!(
        started.elapsed() < Duration::from_secs(40),
        "the run took {:?}",
        started.elapsed()
    );
    let left = lab.sh(
        "l1-1",
        "pgrep -f -a -- '--workdir /tmp/arbor[.]' ; ls -d /tmp/arbor.* 2>/dev/null; true",
    );
    check!(
        left.trim().is_empty(),
        "l1-1 keeps the silent build or its working dir:\n{left}"
    );
    Ok(())
}

fn connect_timeout_applies_at_depth_2(lab: &Lab) -> TestResult {
    clean(lab, false);
    // An address on r1's rack that no host owns, with a permanent neighbour entry: SYNs to
    // it vanish, so only the connect timeout ends the attempt.
    lab.sh(
        "r1",
        "ip neigh replace 10.199.1.99 lladdr 02:00:00:00:01:99 dev rack0 nud permanent",
    );
    let _undo = Undo {
        lab,
        host: "r1",
        shell: "ip neigh del 10.199.1.99 dev rack0".into(),
    };
    let topo = topology(
        "defaults:\n  user: root\nhosts:\n- host: 10.199.0.11\n  name: r1\n  children:\n  - host: 10.199.1.11\n    name: l1-1\n    graph: {leaf}\n  - host: 10.199.1.99\n    name: ghost\n    graph: {leaf}\n",
    );
    let out = run(
        lab,
        &topo,
        &["--converged-timeout", "1", "--connect-timeout", "2"],
    );
    let log = exited(&out, 1)?;
    check!(
        log.lines()
            .any(|l| l.contains("r1/ghost: FAILED") && l.contains("timed out after 2s")),
        "the leaf behind r1 did not time out after 2 s\n{log}"
    );
    Ok(())
}

fn remote_tmp_and_verbosity_apply_at_depth_2(lab: &Lab) -> TestResult {
    clean(lab, false);
    lab.sh("l1-1", "rm -rf /var/tmp/arbor.*");
    let topo = topology(
        "defaults:\n  user: root\nhosts:\n- host: 10.199.0.11\n  name: r1\n  children:\n  - host: 10.199.1.11\n    name: l1-1\n    graph: {leaf}\n",
    );
    let (mut running, rx) = start(lab, &topo, &["--remote-tmp", "/var/tmp", "-v"]);
    let seen = wait_lines(
        &rx,
        &["r1/l1-1: converged".to_string()],
        Duration::from_secs(60),
    )?;
    check!(
        seen.iter()
            .any(|l| l.contains(" r1/l1-1 | ") && l.contains("node at depth 2 starting")),
        "no debug line from the leaf under -v:\n{}",
        seen.join("\n")
    );
    let dirs = lab.sh(
        "l1-1",
        "ls -d /var/tmp/arbor.* /tmp/arbor.* 2>/dev/null; true",
    );
    check!(
        dirs.trim().starts_with("/var/tmp/arbor.") && !dirs.contains("\n/tmp/arbor."),
        "l1-1's working dir is not under --remote-tmp /var/tmp: {dirs}"
    );
    let status = stop_with(&mut running, libc::SIGINT)?;
    check!(status.code() == Some(130), "exit {:?}", status.code());
    let left = lab.sh("l1-1", "ls -d /var/tmp/arbor.* 2>/dev/null; true");
    check!(left.trim().is_empty(), "l1-1 keeps {left}");
    Ok(())
}

fn a_relays_graph_cannot_use_the_agent_to_log_in_outside_its_subtree(lab: &Lab) -> TestResult {
    clean(lab, false);
    lab.sh("r1", "rm -f /tmp/reached /tmp/graph-env");
    // r1's own graph hunts for agent sockets (those sshd forwarded, and the one r1 serves
    // from its QUIC link) and tries each on r2 (outside its subtree) and on l1-1 (inside it),
    // with OpenSSH's ssh, which binds the agent to the session.
    let dir = tempfile::tempdir().map_err(fail)?;
    let thief = dir.path().join("thief.yaml");
    std::fs::write(
        &thief,
        r#"graph: thief
resources:
  exec:
  - name: steal
    shell: /bin/sh
    cmd: >-
      echo "SSH_AUTH_SOCK=$SSH_AUTH_SOCK" > /tmp/graph-env;
      for s in /tmp/ssh-*/agent.* /tmp/arbor.*/agent.sock; do for t in 10.199.0.12 10.199.1.11; do
      SSH_AUTH_SOCK=$s ssh -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=no
      -o UserKnownHostsFile=/dev/null -o ConnectTimeout=3 -o LogLevel=ERROR root@$t true
      && echo "$s $t" >> /tmp/reached; done; done; true
edges: []
"#,
    )
    .map_err(fail)?;
    let topo = topology(&TWO_RELAYS.replace(
        "  name: r1
",
        &format!(
            "  name: r1
  graph: {}
",
            thief.display()
        ),
    ));
    let out = run(lab, &topo, &["--converged-timeout", "2"]);
    let log = exited(&out, 0)?;
    let env = lab.sh("r1", "cat /tmp/graph-env 2>&1; true");
    check!(
        env.trim() == "SSH_AUTH_SOCK=",
        "r1's graph saw an agent socket in its environment: {env}"
    );
    let reached = lab.sh("r1", "cat /tmp/reached 2>/dev/null; true");
    check!(
        reached.contains("10.199.1.11"),
        "the agent socket was not found or did not work for r1's own leaf (no control):          {reached:?}
{log}"
    );
    check!(
        reached.contains("/agent.sock 10.199.1.11"),
        "the agent on r1's QUIC link was not found or did not work for its own leaf (no \
         control): {reached:?}\n{log}"
    );
    check!(
        !reached.contains("10.199.0.12"),
        "r1's graph logged into r2 with the operator's agent
{log}"
    );
    check!(
        log.contains("r1: refused an agent request"),
        "no refusal reported for r1
{log}"
    );
    Ok(())
}

/// A HOME of the test's own, with the lab's client key and known_hosts: its
/// `~/.local/state/arbor` (the store's data) and known_hosts are the test's to inspect.
fn private_home(lab: &Lab) -> Result<tempfile::TempDir, libtest_mimic::Failed> {
    let home = tempfile::tempdir().map_err(fail)?;
    let ssh_dir = home.path().join(".ssh");
    std::fs::create_dir_all(&ssh_dir).map_err(fail)?;
    for file in ["id_ed25519", "known_hosts"] {
        std::fs::copy(lab.home().join(".ssh").join(file), ssh_dir.join(file)).map_err(fail)?;
    }
    Ok(home)
}

fn a_new_run_never_takes_a_killed_runs_converged_flags_for_its_own(lab: &Lab) -> TestResult {
    clean(lab, false);
    lab.sh("l1-1", "rm -f /tmp/slow-done");
    let dir = tempfile::tempdir().map_err(fail)?;
    let graph = dir.path().join("slow.yaml");
    std::fs::write(
        &graph,
        "graph: slow\nresources:\n  exec:\n  - name: slow\n    cmd: \"sleep 6; touch /tmp/slow-done\"\n    shell: /bin/sh\nedges: []\n",
    )
    .map_err(fail)?;
    let topo = topology(&format!(
        "defaults:\n  user: root\nhosts:\n- host: 10.199.0.11\n  name: r1\n  children:\n  - host: 10.199.1.11\n    name: l1-1\n    graph: {}\n",
        graph.display()
    ));
    // The store persists under this HOME (no --tmp-prefix), as an operator's runs do.
    let home = private_home(lab)?;
    let args = ["--topology", topo.path.to_str().unwrap_or_default()];
    // A short grace: the hosts of a killed initiator wait that long for a re-attach.
    let first_args = [&args[..], &["--reconnect-grace", "2"]].concat();
    let mut first = arbor_command(lab, home.path(), &first_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(fail)?;
    let rx = lines_of(first.stdout.take().expect("stdout"));
    let mut first = Running(first);
    wait_lines(
        &rx,
        &["r1/l1-1: converged".to_string()],
        Duration::from_secs(60),
    )?;
    // Killed: its hosts' converged flags stay in the store until their leases expire.
    first.0.kill().map_err(fail)?;
    let _ = first.0.wait();
    check_no_leftovers_within(lab, &["r1", "l1-1"], Duration::from_secs(20))?;
    lab.sh("l1-1", "rm -f /tmp/slow-done");

    let mut with_timeout = args.to_vec();
    with_timeout.extend(["--converged-timeout", "1"]);
    let out = arbor_command(lab, home.path(), &with_timeout)
        .output()
        .map_err(fail)?;
    let log = exited(&out, 0)?;
    let done = lab.sh("l1-1", "ls /tmp/slow-done 2>&1; true");
    check!(
        done.trim() == "/tmp/slow-done",
        "the second run ended before l1-1 converged (it took the killed run's flag): {done}\n{log}"
    );
    Ok(())
}

fn a_misbehaving_relay_cannot_forge_states_host_keys_or_terminal_escapes(lab: &Lab) -> TestResult {
    clean(lab, false);
    // r1 runs a test build that forges (ARBOR_TEST_MISBEHAVE, honoured by debug builds only).
    lab.sh(
        "r1",
        "mkdir -p /root/.ssh && echo ARBOR_TEST_MISBEHAVE=forge > /root/.ssh/environment",
    );
    let _undo = Undo {
        lab,
        host: "r1",
        shell: "rm -f /root/.ssh/environment".into(),
    };
    // accept-new, so host-key reports are acted on; a HOME of our own to see what is written.
    let home = private_home(lab)?;
    let known = home.path().join(".ssh/known_hosts");
    let before = std::fs::read_to_string(&known).map_err(fail)?;
    let topo = topology(TWO_RELAYS);
    let out = arbor_command(
        lab,
        home.path(),
        &[
            "--topology",
            topo.path.to_str().unwrap_or_default(),
            "--tmp-prefix",
            "--converged-timeout",
            "2",
            "--host-key-policy",
            "accept-new",
        ],
    )
    .output()
    .map_err(fail)?;
    // l2-1 and r2 were not failed by r1's forged events: the run converges with exit 0.
    let log = exchanged(lab, &out)?;
    check!(
        log.contains("r1 | forged ^[]0;owned^G^[[2J^[[31mescapes"),
        "the forged log line did not arrive escaped\n{log}"
    );
    check!(
        !out.stdout.contains(&0x1b),
        "raw escape bytes reached the terminal\n{log}"
    );
    check!(
        log.contains("not in its subtree"),
        "no warning about r1's events outside its subtree\n{log}"
    );
    let after = std::fs::read_to_string(&known).map_err(fail)?;
    check!(
        after == before,
        "forged host-key reports changed known_hosts:\n{}",
        &after[before.len().min(after.len())..]
    );
    // The store refused r1 everything beyond its own keys.
    for attack in [
        "publishing as another host",
        "reading the store without a credential",
        "writing another host's export",
        "writing another host's converged flag",
        "deleting every key",
        "compacting",
    ] {
        check!(
            log.contains(&format!("misbehaving: {attack}: refused")),
            "the store did not refuse r1 {attack}\n{log}"
        );
    }
    check!(
        !log.contains(": ALLOWED"),
        "the store allowed r1 something beyond its own keys\n{log}"
    );
    // r1's own hostile exports: the escaping file landed under the collect pattern without
    // its setuid bit, nothing was written outside it, and the `absent` export deleted nothing.

    for leaf in LEAVES {
        let seen = lab.sh(
            leaf,
            "stat -c '%a %n' /tmp/escaped 2>&1; ls /root/escaped 2>&1; ls /tmp/from-l1-2",
        );
        check!(
            seen.contains("755 /tmp/escaped")
                && seen.contains("cannot access '/root/escaped'")
                && seen.contains("/tmp/from-l1-2"),
            "{leaf} after r1's forged exports:\n{seen}"
        );
    }
    Ok(())
}

fn no_caching_and_noop_apply_at_depth_2(lab: &Lab) -> TestResult {
    clean(lab, true);
    let topo = topology(TWO_RELAYS);
    let out = run(
        lab,
        &topo,
        &["--converged-timeout", "1", "--no-caching", "--noop"],
    );
    let log = exited(&out, 0)?;
    for h in HOSTS {
        let cached = cached_builds(lab, h);
        check!(
            cached.is_empty(),
            "{h} kept {cached:?} in its cache under --no-caching\n{log}"
        );
        let made = lab.sh(h, "ls /tmp/from-* 2>/dev/null; true");
        check!(
            made.trim().is_empty(),
            "{h} changed files under --noop: {made}\n{log}"
        );
    }
    check_no_leftovers(lab, &HOSTS)
}

fn noop_diff_shows_a_depth_2_leafs_diff_and_changes_nothing_then_diff_applies_it(
    lab: &Lab,
) -> TestResult {
    clean(lab, false);
    // On l1-1, behind r1: a file whose second line and mode differ from the graph's, with a
    // terminal escape in the line the diff will show.
    let seed = "printf 'one\\nTWO\\033[2J\\nthree\\n' > /tmp/diffed && chmod 600 /tmp/diffed";
    lab.sh("l1-1", seed);
    let dir = tempfile::tempdir().map_err(fail)?;
    let graph = dir.path().join("diffed.yaml");
    std::fs::write(
        &graph,
        "graph: diffed\nresources:\n  file:\n  - name: diffed\n    path: /tmp/diffed\n    content: \"one\\ntwo\\nthree\\n\"\n    mode: \"0640\"\nedges: []\n",
    )
    .map_err(fail)?;
    let topo = topology(&format!(
        "defaults:\n  user: root\nhosts:\n- host: 10.199.0.11\n  name: r1\n  children:\n  - host: 10.199.1.11\n    name: l1-1\n    graph: {}\n",
        graph.display()
    ));
    let on_leaf = || lab.sh("l1-1", "stat -c %a /tmp/diffed; cat /tmp/diffed");
    let want_lines = [
        "r1/l1-1 | /tmp/diffed: mode 0600 -> 0640",
        "r1/l1-1 | --- /tmp/diffed",
        "r1/l1-1 | +++ /tmp/diffed",
        "r1/l1-1 | @@ -1,3 +1,3 @@",
        "r1/l1-1 |  one",
        "r1/l1-1 | -TWO^[[2J",
        "r1/l1-1 | +two",
        "r1/l1-1 |  three",
    ];
    let shows_the_diff = |out: &Output, log: &str| -> TestResult {
        let stdout = String::from_utf8_lossy(&out.stdout);
        // Plain lines start with a timestamp.
        let diff: Vec<&str> = stdout
            .lines()
            .map(|l| if is_timestamped(l) { &l[25..] } else { l })
            .filter(|l| l.starts_with("r1/l1-1 | ") && !l.contains(" INFO "))
            .collect();
        check!(diff == want_lines, "diff lines {diff:#?}\n{log}");
        check!(
            !stdout.contains('\x1b'),
            "a terminal escape from the host reached stdout\n{log}"
        );
        Ok(())
    };

    let out = run(
        lab,
        &topo,
        &["--noop", "--diff", "--converged-timeout", "1"],
    );
    let log = exited(&out, 0)?;
    shows_the_diff(&out, &log)?;
    let held = on_leaf();
    check!(
        held == "600\none\nTWO\x1b[2J\nthree\n",
        "--noop changed the file: {held:?}\n{log}"
    );

    let out = run(lab, &topo, &["--diff", "--converged-timeout", "1"]);
    let log = exited(&out, 0)?;
    shows_the_diff(&out, &log)?;
    let held = on_leaf();
    check!(
        held == "640\none\ntwo\nthree\n",
        "--diff did not apply: {held:?}\n{log}"
    );

    // Now right: nothing to show.
    let out = run(lab, &topo, &["--diff", "--converged-timeout", "1"]);
    let log = exited(&out, 0)?;
    check!(
        !String::from_utf8_lossy(&out.stdout).contains("r1/l1-1 | ---"),
        "a diff for a file already right\n{log}"
    );
    lab.sh("l1-1", "rm -f /tmp/diffed");
    check_no_leftovers(lab, &["r1", "l1-1"])
}

fn staged_hosts_ignore_their_own_config_files_and_arbor_variables(lab: &Lab) -> TestResult {
    clean(lab, false);
    // A relay and its leaf each hold a config file and ARBOR_* variables (sshd sets them from
    // ~/.ssh/environment) that would stop an initiator with exit 2: a staged node takes its
    // settings from the link only.
    let mut undo = Vec::new();
    for h in ["r1", "l1-1"] {
        lab.sh(
            h,
            "mkdir -p /root/.config/arbor /root/.ssh && \
             printf 'bogus = 1\\noutput = \"xml\"\\n' > /root/.config/arbor/config.toml && \
             printf 'ARBOR_OUTPUT=json\\nARBOR_CCONNS=lots\\n' > /root/.ssh/environment",
        );
        undo.push(Undo {
            lab,
            host: h,
            shell: "rm -rf /root/.config/arbor /root/.ssh/environment".into(),
        });
    }
    let topo = topology(
        "defaults:\n  user: root\nhosts:\n- host: 10.199.0.11\n  name: r1\n  graph: {leaf}\n  children:\n  - host: 10.199.1.11\n    name: l1-1\n    graph: {leaf}\n",
    );
    let out = run(lab, &topo, &["--converged-timeout", "1"]);
    let log = exited(&out, 0)?;
    for h in ["r1/l1-1", "r1"] {
        check!(
            log.contains(&format!("{h}: converged")),
            "{h} did not converge\n{log}"
        );
    }
    check!(
        collected(lab, "l1-1") == expect_collected(&["l1-1", "r1"]),
        "l1-1 collected {:?}\n{log}",
        collected(lab, "l1-1")
    );
    drop(undo);
    check_no_leftovers(lab, &["r1", "l1-1"])
}

fn live_edits_reach_a_depth_2_leaf_saved_in_place_and_by_rename(lab: &Lab) -> TestResult {
    clean(lab, false);
    lab.sh("l1-1", "rm -f /tmp/edited-*");
    let dir = tempfile::tempdir().map_err(fail)?;
    let graph = dir.path().join("edit.yaml");
    let version = |content: &str| {
        format!(
            "graph: edit\nresources:\n  file:\n  - name: edited\n    path: \"/tmp/edited-{{{{hostname}}}}\"\n    content: \"{content}\\n\"\n    state: exists\nedges: []\n"
        )
    };
    std::fs::write(&graph, version("v1")).map_err(fail)?;
    let topo = topology(&format!(
        "defaults:\n  user: root\nhosts:\n- host: 10.199.0.11\n  name: r1\n  children:\n  - host: 10.199.1.11\n    name: l1-1\n    graph: {}\n",
        graph.display()
    ));
    let (mut running, rx) = start_logging(lab, &topo, &[]);
    wait_lines(
        &rx,
        &["r1/l1-1: converged".to_string()],
        Duration::from_secs(60),
    )?;
    let content = || lab.sh("l1-1", "cat /tmp/edited-l1-1 2>/dev/null; true");
    let wait_content = |want: &str| -> TestResult {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if content() == format!("{want}\n") {
                return Ok(());
            }
            check!(
                Instant::now() < deadline,
                "l1-1 never got {want:?}; it has {:?}",
                content()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_content("v1")?;
    // Saved in place.
    std::fs::write(&graph, version("v2")).map_err(fail)?;
    wait_content("v2")?;
    // Saved by rename, as editors do.
    let temp = dir.path().join(".edit.yaml.swp");
    std::fs::write(&temp, version("v3")).map_err(fail)?;
    std::fs::rename(&temp, &graph).map_err(fail)?;
    wait_content("v3")?;
    // A bad edit is reported with file:line:col, and the leaf keeps its graph.
    std::fs::write(&graph, "graph: edit\nbogus: 1\n").map_err(fail)?;
    let at = format!("{}:2:", graph.display());
    wait_lines(&rx, std::slice::from_ref(&at), Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_millis(300));
    check!(
        content() == "v3\n",
        "a bad edit changed l1-1: {:?}",
        content()
    );
    std::fs::write(&graph, version("v4")).map_err(fail)?;
    wait_content("v4")?;
    let status = stop_with(&mut running, libc::SIGINT)?;
    check!(status.code() == Some(130), "exit {:?}", status.code());
    Ok(())
}

fn a_killed_relay_fails_its_subtree_and_the_rest_converges(lab: &Lab) -> TestResult {
    clean(lab, false);
    let topo = topology(TWO_RELAYS);
    // A short grace: the leaves of a relay that vanished wait that long for a re-attach.
    let (mut running, rx) = start(
        lab,
        &topo,
        &["--converged-timeout", "3", "--reconnect-grace", "3"],
    );
    wait_lines(
        &rx,
        &[
            "r1/l1-1: running".to_string(),
            "r1/l1-2: running".to_string(),
            "r1/l1-3: running".to_string(),
        ],
        Duration::from_secs(90),
    )?;
    // Kill r1's arbor outright: no shutdown path runs there. (Every leaf runs by now: a leaf
    // whose relay dies while staging it keeps the working dir the relay's probe made, since
    // nothing of arbor runs there yet to remove it.)
    lab.sh("r1", "pkill -9 -x arbor");
    let mut lines = Vec::new();
    let status = loop {
        while let Ok(line) = rx.try_recv() {
            lines.push(line);
        }
        if let Some(s) = running.0.try_wait().map_err(fail)? {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
        lines.push(line);
    }
    let log = lines.join("\n");
    check!(status.code() == Some(1), "exit {:?}\n{log}", status.code());
    check!(
        log.contains("r1: FAILED: r1: arbor ended unexpectedly (killed by SIGKILL"),
        "no clear cause for r1\n{log}"
    );
    // The summary: r1 failed, its leaves have rows of their own below it, failed with it;
    // r2's are ok.
    let summary: Vec<&str> = log
        .lines()
        .skip_while(|l| !(l.starts_with("HOST") && l.contains("RESULT")))
        .collect();
    let row = |name: &str| {
        summary
            .iter()
            .find(|l| l.starts_with(&format!("{name} ")))
            .copied()
            .unwrap_or("")
    };
    check!(
        row("r1").contains(" failed "),
        "summary row for r1: {:?}\n{log}",
        row("r1")
    );
    for leaf in ["r1/l1-1", "r1/l1-2", "r1/l1-3"] {
        check!(
            row(leaf).contains(" failed ") && row(leaf).contains("relay failed"),
            "summary row for {leaf}: {:?}\n{log}",
            row(leaf)
        );
    }
    for leaf in ["r2/l2-1", "r2/l2-2", "r2/l2-3"] {
        check!(
            row(leaf).contains(" ok "),
            "summary row for {leaf}: {:?}\n{log}",
            row(leaf)
        );
    }
    // r2's subtree carried on: each of its leaves has at least its own rack's files.
    for leaf in ["l2-1", "l2-2", "l2-3"] {
        let got = collected(lab, leaf);
        for n in ["l2-1", "l2-2", "l2-3"] {
            check!(
                got.contains(&format!("from-{n}: hello from {n}")),
                "{leaf} lacks {n}'s file:\n{got}\n{log}"
            );
        }
    }
    // r1's leaves lost their relay: at the end of their grace for a re-attach (3 s) they
    // exit and clean up on their own.
    check_no_leftovers_within(lab, &HOSTS, Duration::from_secs(20))
}

fn leaf_host_keys_are_learned_at_depth_only_under_accept_new(lab: &Lab) -> TestResult {
    clean(lab, false);
    // A HOME whose known_hosts knows the relays but no leaf.
    let home = tempfile::tempdir().map_err(fail)?;
    let ssh_dir = home.path().join(".ssh");
    std::fs::create_dir_all(&ssh_dir).map_err(fail)?;
    std::fs::copy(
        lab.home().join(".ssh/id_ed25519"),
        ssh_dir.join("id_ed25519"),
    )
    .map_err(fail)?;
    let kh = std::fs::read_to_string(lab.home().join(".ssh/known_hosts")).map_err(fail)?;
    let relays_only: Vec<&str> = kh
        .lines()
        .filter(|l| !l.starts_with("10.199.1.1") && !l.starts_with("10.199.2.1"))
        .collect();
    let known = ssh_dir.join("known_hosts");
    std::fs::write(&known, relays_only.join("\n") + "\n").map_err(fail)?;
    // As Debian's ssh_config does: learned names are then written hashed.
    std::fs::write(ssh_dir.join("config"), "Host *\n    HashKnownHosts yes\n").map_err(fail)?;
    let topo = topology(TWO_RELAYS);
    let args = [
        "--topology",
        topo.path.to_str().unwrap_or_default(),
        "--tmp-prefix",
        "--converged-timeout",
        "2",
    ];

    let strict = arbor_command(lab, home.path(), &args)
        .output()
        .map_err(fail)?;
    let log = text(&strict);
    check!(
        strict.status.code() == Some(1),
        "strict: exit {:?}\n{log}",
        strict.status.code()
    );
    check!(
        log.contains("l1-1: host key: unknown host key"),
        "strict: no host key refusal for l1-1\n{log}"
    );
    let after = std::fs::read_to_string(&known).map_err(fail)?;
    check!(
        !after.contains("10.199.1.11 "),
        "strict recorded a key:\n{after}"
    );

    let mut accept: Vec<&str> = args.to_vec();
    accept.extend(["--host-key-policy", "accept-new"]);
    let learned = arbor_command(lab, home.path(), &accept)
        .output()
        .map_err(fail)?;
    let log = text(&learned);
    check!(
        learned.status.code() == Some(0),
        "accept-new: exit {:?}\n{log}",
        learned.status.code()
    );
    let after = std::fs::read_to_string(&known).map_err(fail)?;
    for leaf in LEAVES {
        let addr = lab.addr(leaf);
        let real = lab.sh(leaf, "cut -d' ' -f1,2 /run/arbor/ssh_host_ed25519_key.pub");
        let key = russh::keys::PublicKey::from_openssh(real.trim()).map_err(fail)?;
        let known_now = arbor::ssh::known_hosts::KnownHosts::load(std::slice::from_ref(&known))
            .map_err(fail)?;
        check!(
            matches!(
                known_now.verify(&addr, &key),
                arbor::ssh::known_hosts::Verdict::Trusted(_)
            ),
            "known_hosts lacks {leaf}'s real key ({addr}):\n{after}"
        );
        check!(
            !after.contains(&format!("{addr} ")),
            "{leaf}'s name was recorded in clear despite HashKnownHosts yes:\n{after}"
        );
    }
    Ok(())
}

fn a_bad_topology_exits_2(lab: &Lab) -> TestResult {
    let topo = topology(&TWO_RELAYS.replace("  name: r2\n", "  name: r2\n  colour: blue\n"));
    let (tx0, _) = lab.init_link_bytes();
    let out = run(lab, &topo, &["--converged-timeout", "1"]);
    let (tx1, _) = lab.init_link_bytes();
    let log = exited(&out, 2)?;
    check!(
        log.contains(&format!("{}:12:3:", topo.path.display())) && log.contains("colour"),
        "no file:line for the unknown key\n{log}"
    );
    check!(
        tx1 - tx0 < 1000,
        "{} bytes went out for a bad topology",
        tx1 - tx0
    );
    Ok(())
}

/// The event types docs/events.md documents (its `### \`type\`` headings).
fn documented_event_types() -> Vec<String> {
    let doc = std::fs::read_to_string(support::repo_root().join("docs/events.md"))
        .expect("docs/events.md");
    doc.lines()
        .filter_map(|l| l.strip_prefix("### `")?.strip_suffix('`'))
        .map(str::to_string)
        .collect()
}

fn json_output_is_one_event_per_line_in_order_at_every_depth(lab: &Lab) -> TestResult {
    clean(lab, false);
    // Leaves unknown to known_hosts, learned under accept-new: host_key events too.
    let home = private_home(lab)?;
    let known = home.path().join(".ssh/known_hosts");
    let kh = std::fs::read_to_string(&known).map_err(fail)?;
    let relays_only: Vec<&str> = kh
        .lines()
        .filter(|l| !l.starts_with("10.199.1.1") && !l.starts_with("10.199.2.1"))
        .collect();
    std::fs::write(&known, relays_only.join("\n") + "\n").map_err(fail)?;
    let topo = topology(TWO_RELAYS);
    let out = arbor_command(
        lab,
        home.path(),
        &[
            "--topology",
            topo.path.to_str().unwrap_or_default(),
            "--tmp-prefix",
            "--converged-timeout",
            "2",
            "--host-key-policy",
            "accept-new",
            "--output",
            "json",
            // Each leaf creates its file: a diff event each.
            "--diff",
        ],
    )
    .output()
    .map_err(fail)?;
    let log = exited(&out, 0)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let documented = documented_event_types();
    check!(documented.len() == 8, "docs/events.md lists {documented:?}");
    let mut seen = std::collections::BTreeSet::new();
    // Per host: the order its events came in, as phases (0 staging, 1 running, 2 exited).
    let mut phase: std::collections::BTreeMap<String, u8> = Default::default();
    let lines: Vec<&str> = stdout.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| fail(format!("line {} is not JSON ({e}): {line}\n{log}", i + 1)))?;
        check!(v["v"] == 1, "no version: {line}");
        let ts = v["ts"].as_str().unwrap_or_default();
        check!(
            ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
            "timestamp {ts:?}: {line}"
        );
        let kind = v["type"].as_str().unwrap_or_default().to_string();
        check!(documented.contains(&kind), "undocumented type: {line}");
        seen.insert(kind.clone());
        if kind == "summary" {
            check!(i == lines.len() - 1, "summary is not the last line: {line}");
            check!(v["exit_code"] == 0, "{line}");
            let hosts: Vec<&str> = v["hosts"]
                .as_array()
                .map(|a| a.iter().filter_map(|h| h["host"].as_str()).collect())
                .unwrap_or_default();
            let want = [
                "r1", "r1/l1-1", "r1/l1-2", "r1/l1-3", "r2", "r2/l2-1", "r2/l2-2", "r2/l2-3",
            ];
            check!(hosts == want, "summary hosts {hosts:?}: {line}");
            continue;
        }
        let host = v["host"].as_str().unwrap_or_default().to_string();
        check!(!host.is_empty(), "no host: {line}");
        let p = phase.entry(host.clone()).or_insert(0);
        check!(*p < 2, "{host}: an event after it exited: {line}");
        match (kind.as_str(), v["state"].as_str()) {
            ("stage", _) => check!(*p == 0, "{host}: a stage after running: {line}"),
            ("state", Some("running")) => *p = 1,
            ("state", Some("exited")) => *p = 2,
            ("state", Some("failed")) => return Err(fail(format!("failed: {line}"))),
            ("diff", _) => check!(
                v["resource"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("file[@@"))
                    && v["lines"][1]
                        .as_str()
                        .is_some_and(|l| l.starts_with("--- /dev/null")),
                "{host}: a diff event without its resource or lines: {line}"
            ),
            _ => {}
        }
    }
    let all: std::collections::BTreeSet<String> = documented.into_iter().collect();
    check!(seen == all, "emitted {seen:?}, documented {all:?}");
    for h in [
        "r1", "r1/l1-1", "r1/l1-2", "r1/l1-3", "r2", "r2/l2-1", "r2/l2-2", "r2/l2-3",
    ] {
        check!(
            phase.get(h) == Some(&2),
            "{h} did not end with exited: {:?}",
            phase.get(h)
        );
    }
    // Nothing but JSON on stdout; arbor's own words went to stderr.
    check!(
        !stdout.contains("HOST "),
        "the text summary reached stdout:\n{stdout}"
    );
    Ok(())
}

fn quiet_reaches_hosts_at_depth_2(lab: &Lab) -> TestResult {
    clean(lab, false);
    // JSON shows every event it gets, -q or not: so what comes up is what the hosts sent.
    let topo = topology(TWO_RELAYS);
    let out = run(
        lab,
        &topo,
        &["-q", "--output", "json", "--converged-timeout", "2"],
    );
    let log = exited(&out, 0)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let logs: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("\"type\":\"log\""))
        .collect();
    check!(
        logs.iter().all(|l| !l.contains(" INFO ")),
        "hosts logged at info under -q:\n{}\n{log}",
        logs.join("\n")
    );
    for leaf in ["r1/l1-1", "r2/l2-3"] {
        check!(
            stdout.contains(&format!("\"host\":\"{leaf}\"")),
            "no events from {leaf}:\n{stdout}"
        );
    }
    Ok(())
}

/// Drops every packet between `host` and `peer` (both ways, in `host`'s namespace), so no FIN
/// and no RST ever arrives, as when a cable or a VPN goes away; undone when the guard drops.
fn cut_link<'a>(
    lab: &'a Lab,
    host: &'a str,
    peer: &str,
) -> Result<Undo<'a>, libtest_mimic::Failed> {
    let cut = lab.exec(
        host,
        &format!(
            "nft add table inet arbor_cut && \
             nft 'add chain inet arbor_cut in {{ type filter hook input priority 0; }}' && \
             nft 'add chain inet arbor_cut out {{ type filter hook output priority 0; }}' && \
             nft add rule inet arbor_cut in ip saddr {peer} drop && \
             nft add rule inet arbor_cut out ip daddr {peer} drop"
        ),
    );
    let mend = Undo {
        lab,
        host,
        shell: "nft delete table inet arbor_cut 2>/dev/null; true".into(),
    };
    check!(
        cut.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&cut.stderr)
    );
    Ok(mend)
}

/// The permanent cut: r1's link to the initiator goes for good (no FIN). Both ends count it
/// down after the link timeout (3 s): the initiator shows r1 as reconnecting, not failed, and
/// r1's subtree runs on through the grace period (8 s); then r1 tears its subtree down on its
/// own (every arbor and working dir on r1 and its leaves gone within the grace period plus
/// 15 s), and the initiator fails r1 naming the step, and exits 1.
fn a_permanent_cut_keeps_the_subtree_for_the_grace_period_then_tears_it_down(
    lab: &Lab,
) -> TestResult {
    clean(lab, false);
    let topo = topology(
        "defaults:\n  user: root\nhosts:\n- host: 10.199.0.11\n  name: r1\n  children:\n  - host: 10.199.1.1[1-3]\n    name: l1-[1-3]\n    graph: {leaf}\n",
    );
    let (mut running, rx) = start(
        lab,
        &topo,
        &["--link-timeout", "3", "--reconnect-grace", "8"],
    );
    let converged: Vec<String> = ["r1/l1-1", "r1/l1-2", "r1/l1-3"]
        .iter()
        .map(|p| format!("{p}: converged"))
        .collect();
    wait_lines(&rx, &converged, Duration::from_secs(90))?;
    let init = lab.get("LAB_INIT_ADDR").to_string();
    let _mend = cut_link(lab, "r1", &init)?;
    let cut_at = Instant::now();
    // The initiator hears nothing from r1 for 3 s: reconnecting, not failed.
    let seen = wait_lines(
        &rx,
        &["r1: reconnecting".to_string()],
        Duration::from_secs(20),
    )?;
    let noticed = cut_at.elapsed();
    check!(
        noticed >= Duration::from_secs(2),
        "r1 reconnecting after {noticed:?}, before the link timeout"
    );
    check!(
        !seen.iter().any(|l| l.contains("FAILED")),
        "a host failed before the grace period was over:\n{}",
        seen.join("\n")
    );
    // Well into the grace period (5 s into it, when a node that tore down at the link
    // timeout would be long gone) the subtree keeps running.
    std::thread::sleep(Duration::from_secs(8).saturating_sub(cut_at.elapsed()));
    for h in ["l1-1", "l1-2", "l1-3", "r1"] {
        let n = lab.sh(h, "pgrep -x -c arbor || true");
        check!(
            n.trim() != "0",
            "{h}: no arbor running {:?} after the cut, within the grace period",
            cut_at.elapsed()
        );
    }
    // Past it, r1 tears its leaves down and removes every working dir on its own, with no
    // one to tell it: within the link timeout, the grace period and 15 s.
    let limit = Duration::from_secs(3 + 8 + 15);
    for h in ["r1", "l1-1", "l1-2", "l1-3"] {
        loop {
            let left = leftovers(lab, h);
            if left.trim().is_empty() {
                break;
            }
            check!(
                cut_at.elapsed() < limit,
                "{h} still has, {:?} after the cut: {left}",
                cut_at.elapsed()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // The initiator fails r1 (naming the step, link) and, nothing else left, exits 1.
    let status = loop {
        if let Some(status) = running.0.try_wait().map_err(fail)? {
            break status;
        }
        check!(
            cut_at.elapsed() < limit,
            "the initiator still runs {:?} after the cut",
            cut_at.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let rest: Vec<String> = rx.try_iter().collect();
    check!(
        status.code() == Some(1),
        "exit {:?} after the cut, want 1:\n{}",
        status.code(),
        rest.join("\n")
    );
    check!(
        rest.iter()
            .any(|l| l.contains("r1: FAILED: r1: link: down, nothing from it for 11s")),
        "r1's failure does not say the link was down for the link timeout and the grace:\n{}",
        rest.join("\n")
    );
    Ok(())
}

/// ^C while r1's link is down: the initiator waits for no one's grace period (30 s here), it
/// exits 130 at once, naming r1's link as down; r1 tears its subtree down on its own at the
/// end of its grace (a permanent cut's test checks that part).
fn ctrl_c_during_an_outage_does_not_wait_for_the_grace_period(lab: &Lab) -> TestResult {
    clean(lab, false);
    let topo = topology(
        "defaults:\n  user: root\nhosts:\n- host: 10.199.0.11\n  name: r1\n  children:\n  - host: 10.199.1.11\n    name: l1-1\n    graph: {leaf}\n",
    );
    let (mut running, rx) = start(
        lab,
        &topo,
        &["--link-timeout", "2", "--reconnect-grace", "30"],
    );
    wait_lines(
        &rx,
        &["r1/l1-1: converged".to_string()],
        Duration::from_secs(60),
    )?;
    let init = lab.get("LAB_INIT_ADDR").to_string();
    let _mend = cut_link(lab, "r1", &init)?;
    wait_lines(
        &rx,
        &["r1: reconnecting".to_string()],
        Duration::from_secs(15),
    )?;
    let (code, took) = running.interrupt()?;
    let rest: Vec<String> = rx.try_iter().collect();
    check!(
        code == Some(130) && took < Duration::from_secs(8),
        "exit {code:?} {took:?} after ^C during an outage:\n{}",
        rest.join("\n")
    );
    check!(
        rest.iter()
            .any(|l| l.contains("r1: FAILED: r1: link: down") && l.contains("during the shutdown")),
        "r1's link is not named as down:\n{}",
        rest.join("\n")
    );
    // Mend the link and stop what is left (the subtree would go at the end of its grace).
    drop(_mend);
    check_no_leftovers_within(lab, &["r1", "l1-1"], Duration::from_secs(45))
}

fn check_no_leftovers_within(lab: &Lab, hosts: &[&str], within: Duration) -> TestResult {
    let deadline = Instant::now() + within;
    for h in hosts {
        loop {
            let left = leftovers(lab, h);
            if left.trim().is_empty() {
                break;
            }
            check!(Instant::now() < deadline, "{h} has leftovers: {left}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

/// An outage of `outage` seconds, shorter than the grace period (`grace`), on the link `host`
/// has to `peer` (its parent): the host shows as reconnecting, then its link comes back (on
/// the same SSH connection, or re-attached over a new one, whichever is first), nothing
/// fails, no lease expires, and an edit made after the outage reaches the leaf l1-1.
fn ride_out_an_outage(
    lab: &Lab,
    (host, peer): (&str, &str),
    (path, back): (&str, &str),
    (outage, grace): (u64, &str),
) -> TestResult {
    clean(lab, false);
    lab.sh("l1-1", "rm -f /tmp/edited-*");
    let dir = tempfile::tempdir().map_err(fail)?;
    let graph = dir.path().join("edit.yaml");
    let version = |content: &str| {
        format!(
            "graph: edit\nresources:\n  file:\n  - name: edited\n    path: \"/tmp/edited-{{{{hostname}}}}\"\n    content: \"{content}\\n\"\n    state: exists\nedges: []\n"
        )
    };
    std::fs::write(&graph, version("before")).map_err(fail)?;
    let topo = topology(&format!(
        "defaults:\n  user: root\nhosts:\n- host: 10.199.0.11\n  name: r1\n  children:\n  - host: 10.199.1.11\n    name: l1-1\n    graph: {}\n",
        graph.display()
    ));
    let (mut running, rx) = start_logging(
        lab,
        &topo,
        &["--link-timeout", "2", "--reconnect-grace", grace],
    );
    let mut seen = wait_lines(
        &rx,
        &["r1/l1-1: converged".to_string()],
        Duration::from_secs(60),
    )?;
    let content = || lab.sh("l1-1", "cat /tmp/edited-l1-1 2>/dev/null; true");
    check!(content() == "before\n", "l1-1 has {:?}", content());
    {
        let _mend = cut_link(lab, host, peer)?;
        let cut_at = Instant::now();
        seen.extend(wait_lines(
            &rx,
            &[format!("{path}: reconnecting")],
            Duration::from_secs(15),
        )?);
        // Down for `outage` s in all: past the link timeout and the store's lease TTL (10 s),
        // within the grace period (and within SSH's own keepalive limit: the link timeout
        // and the grace).
        std::thread::sleep(Duration::from_secs(outage).saturating_sub(cut_at.elapsed()));
    }
    // Back: the host's state comes back (`back`: running for a relay without a graph,
    // converged for a leaf), and the run goes on.
    seen.extend(wait_lines(
        &rx,
        &[format!("{path}: {back}")],
        Duration::from_secs(20),
    )?);
    std::fs::write(&graph, version("after")).map_err(fail)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while content() != "after\n" {
        check!(
            Instant::now() < deadline,
            "an edit after the outage never reached l1-1; it has {:?}",
            content()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for h in ["r1", "l1-1"] {
        let n = lab.sh(h, "pgrep -x -c arbor || true");
        check!(n.trim() != "0", "{h}: no arbor running after the outage");
    }
    let (code, _) = running.interrupt()?;
    seen.extend(rx.try_iter());
    check!(
        !seen.iter().any(|l| l.contains("FAILED")),
        "a host failed over an outage within the grace period:\n{}",
        seen.join("\n")
    );
    check!(
        code == Some(130),
        "exit {code:?} after ^C:\n{}",
        seen.join("\n")
    );
    // Both ends of the link that went down say it is back, and their sequence numbers show
    // that nothing was lost or repeated either way.
    for end in [
        "its link is back after",
        "the link to the parent is back after",
    ] {
        check!(
            seen.iter()
                .any(|l| l.contains(end) && l.contains("none lost or repeated")),
            "no {end:?} line saying nothing was lost or repeated:\n{}",
            seen.join("\n")
        );
    }
    // The leaf's lease (its converged flag and exports) was held at the store while its link
    // was down: it never expired.
    check!(
        !seen.iter().any(|l| l.contains("lease expired")),
        "a lease expired over an outage within the grace period:\n{}",
        seen.join("\n")
    );
    check_no_leftovers(lab, &["r1", "l1-1"])
}

/// The initiator's link to r1 goes down for 45 s (link timeout 2 s, grace 60 s): by then
/// the old connection's TCP retransmissions have backed off to tens of seconds, so the link
/// usually comes back re-attached over a new SSH connection.
fn an_outage_of_the_initiators_link_within_the_grace_period_is_ridden_out(lab: &Lab) -> TestResult {
    let init = lab.get("LAB_INIT_ADDR").to_string();
    ride_out_an_outage(lab, ("r1", &init), ("r1", "running"), (45, "60"))
}

/// The same at depth: r1's link to its leaf l1-1 goes down for 14 s (grace 30 s).
fn an_outage_at_depth_within_the_grace_period_is_ridden_out(lab: &Lab) -> TestResult {
    ride_out_an_outage(
        lab,
        ("l1-1", "10.199.1.1"),
        ("r1/l1-1", "converged"),
        (14, "30"),
    )
}

/// What a re-staging or a restart would change on `hosts`: the oldest arbor's pid (the node;
/// a re-attach's splice is younger), the working dirs, and the cached builds with their
/// mtimes and inodes.
fn staged_state(lab: &Lab, hosts: &[&str]) -> String {
    hosts
        .iter()
        .map(|h| {
            format!(
                "{h}:\n{}",
                lab.sh(
                    h,
                    "pgrep -x -o arbor; ls -d /tmp/arbor.*; \
                     stat -c '%n %Y %i' /root/.cache/arbor/bin/*/arbor 2>/dev/null; true"
                )
            )
        })
        .collect()
}

/// Kills the sshd process that runs `host`'s arbor (the per-connection one, the arbor's
/// nearest sshd ancestor): the parent's SSH connection is gone, the arbor is not.
fn kill_the_ssh_connection_of(lab: &Lab, host: &str) -> TestResult {
    let out = lab.exec(
        host,
        "p=$(pgrep -x -o arbor); \
         while [ -n \"$p\" ] && [ \"$p\" -gt 1 ]; do \
           case $(cat /proc/$p/comm) in sshd*) kill -9 $p; echo killed $p; exit 0;; esac; \
           p=$(ps -o ppid= -p $p | tr -d ' '); \
         done; exit 1",
    );
    check!(
        out.status.success(),
        "no sshd above {host}'s arbor: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// What a re-attach test checks once the link is back; returns the lines it read.
type AfterReattach =
    dyn Fn(&Lab, &mpsc::Receiver<String>) -> Result<Vec<String>, libtest_mimic::Failed>;

/// A run of r1 and its leaf l1-1 (a graph that writes a file there), whose link to the
/// initiator's SSH connection `disrupt` takes away for good: the initiator re-attaches to
/// r1 over a new SSH connection (nothing re-staged: the same arbor processes, working dirs and
/// cached builds), the store works again through it, an edit made afterwards reaches the leaf,
/// no host fails, and both ends' sequence numbers show nothing lost or repeated.
fn re_attach_after(
    lab: &Lab,
    disrupt: &dyn Fn(&Lab) -> Result<Option<Undo<'_>>, libtest_mimic::Failed>,
    after: &AfterReattach,
) -> TestResult {
    link_survives(lab, Transport::Ssh, disrupt, after)
}

/// Which transport a link test runs its links on (`--transport`).
#[derive(Clone, Copy, PartialEq)]
enum Transport {
    /// SSH alone: a lost connection is re-attached over a new one.
    Ssh,
    /// QUIC (the default, auto, with UDP through): the connection rides the disruption.
    Quic,
}

/// [`re_attach_after`] on `transport`. Over QUIC nothing is re-attached: the link stays up
/// through the disruption (no host goes reconnecting), and the summary says the links ran on
/// QUIC; the store, the edit and the rest are checked as over SSH.
fn link_survives(
    lab: &Lab,
    transport: Transport,
    disrupt: &dyn Fn(&Lab) -> Result<Option<Undo<'_>>, libtest_mimic::Failed>,
    after: &AfterReattach,
) -> TestResult {
    clean(lab, false);
    lab.sh("l1-1", "rm -f /tmp/edited-*");
    let dir = tempfile::tempdir().map_err(fail)?;
    let graph = dir.path().join("edit.yaml");
    let version = |content: &str| {
        format!(
            "graph: edit\nresources:\n  file:\n  - name: edited\n    path: \"/tmp/edited-{{{{hostname}}}}\"\n    content: \"{content}\\n\"\n    state: exists\nedges: []\n"
        )
    };
    std::fs::write(&graph, version("before")).map_err(fail)?;
    let topo = topology(&format!(
        "defaults:\n  user: root\nhosts:\n- host: 10.199.0.11\n  name: r1\n  children:\n  - host: 10.199.1.11\n    name: l1-1\n    graph: {}\n",
        graph.display()
    ));
    let how = match transport {
        Transport::Ssh => "ssh",
        Transport::Quic => "auto",
    };
    let (mut running, rx) = start_logging(
        lab,
        &topo,
        &[
            "--link-timeout",
            "2",
            "--reconnect-grace",
            "30",
            "--transport",
            how,
        ],
    );
    let mut seen = wait_lines(
        &rx,
        &["r1/l1-1: converged".to_string()],
        Duration::from_secs(60),
    )?;
    let content = || lab.sh("l1-1", "cat /tmp/edited-l1-1 2>/dev/null; true");
    check!(content() == "before\n", "l1-1 has {:?}", content());
    let staged = staged_state(lab, &["r1", "l1-1"]);
    let _undo = disrupt(lab)?;
    let at = Instant::now();
    match transport {
        // Back: re-attached, and r1's state shown again (its line and the log's come on two
        // pipes, in either order).
        Transport::Ssh => seen.extend(wait_lines(
            &rx,
            &[
                "re-attached over a new SSH connection".to_string(),
                "r1: running".to_string(),
            ],
            Duration::from_secs(40),
        )?),
        // Four link timeouts: a link that did not survive would have gone reconnecting.
        Transport::Quic => {
            std::thread::sleep(Duration::from_secs(8));
            seen.extend(rx.try_iter());
            check!(
                !seen
                    .iter()
                    .any(|l| l.contains("reconnecting") || l.contains("re-attach")),
                "the QUIC link did not ride the disruption:\n{}",
                seen.join("\n")
            );
        }
    }
    let took = at.elapsed();
    seen.extend(after(lab, &rx)?);
    // The store tunnel works again, through the new connection: the initiator's store answers
    // at r1's socket (refusing a client without a credential, or, as etcdctl names a unix
    // endpoint's authority by its path, refusing the stream at once: either way its HTTP/2
    // server answered; a socket with nothing behind it gives a connection error instead).
    let workdir = lab.sh("r1", "ls -d /tmp/arbor.*").trim().to_string();
    let store = lab.exec(
        "r1",
        &format!(
            "ETCDCTL_API=3 etcdctl --endpoints=unix://{workdir}/store.sock \
             --command-timeout=5s get /x"
        ),
    );
    let said = text(&store);
    check!(
        [
            "user name is empty",
            "permission denied",
            "invalid auth token",
            "RST_STREAM",
        ]
        .iter()
        .any(|m| said.contains(m)),
        "no answer from the store through r1's tunnel after the re-attach:\n{said}"
    );
    std::fs::write(&graph, version("after")).map_err(fail)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while content() != "after\n" {
        check!(
            Instant::now() < deadline,
            "an edit after the re-attach never reached l1-1; it has {:?}",
            content()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Nothing was staged again: the same nodes, working dirs and cached builds.
    let now = staged_state(lab, &["r1", "l1-1"]);
    check!(
        now == staged,
        "re-staged or restarted:\nbefore:\n{staged}\nafter:\n{now}"
    );
    let (code, _) = running.interrupt()?;
    seen.extend(rx.try_iter());
    let all = seen.join("\n");
    check!(code == Some(130), "exit {code:?} after ^C:\n{all}");
    check!(
        !seen.iter().any(|l| l.contains("FAILED")),
        "a host failed over a re-attach:\n{all}"
    );
    if transport == Transport::Quic {
        check!(
            seen.iter()
                .any(|l| l.contains("links on QUIC: r1, r1/l1-1")),
            "the summary does not say both links ran on QUIC:\n{all}"
        );
        check!(
            !seen.iter().any(|l| l.contains("lease expired")),
            "a lease expired over the disruption:\n{all}"
        );
        return check_no_leftovers(lab, &["r1", "l1-1"]);
    }
    // Both ends say the link is back, and their sequence numbers show nothing lost or
    // repeated either way (each end replayed what the other had not taken).
    check!(
        seen.iter().any(|l| l.contains("r1: its link is back after")
            && l.contains("re-attached over a new SSH connection")
            && l.contains("none lost or repeated")),
        "the initiator does not say r1 re-attached with nothing lost or repeated:\n{all}"
    );
    check!(
        seen.iter().any(|l| l.contains("r1 |")
            && l.contains("the link to the parent is back after")
            && l.contains("re-attached over a new connection")
            && l.contains("none lost or repeated")),
        "r1 does not say its parent re-attached with nothing lost or repeated:\n{all}"
    );
    check!(
        !seen.iter().any(|l| l.contains("lease expired")),
        "a lease expired over the re-attach:\n{all}"
    );
    eprintln!("re-attached {took:?} after the disruption");
    check_no_leftovers(lab, &["r1", "l1-1"])
}

/// The initiator's address changes mid-run (a new one added, the old one removed, as a
/// laptop's on a new network): its SSH connection to r1 is dead without a FIN, so the link
/// goes down, and the initiator re-attaches from the new address (r1's sshd sees it).
fn when_the_initiators_address_changes_it_re_attaches_over_a_new_ssh_connection(
    lab: &Lab,
) -> TestResult {
    re_attach_after(lab, &change_the_initiators_address, &|lab, _| {
        let peers = lab.sh("r1", "ss -Htn state established '( sport = :22 )'");
        check!(
            peers.contains("10.199.0.2:"),
            "r1 has no SSH connection from the initiator's new address:\n{peers}"
        );
        Ok(Vec::new())
    })
}

/// The initiator's address moves from 10.199.0.1 to 10.199.0.2 (put back when the returned
/// guard drops).
fn change_the_initiators_address(lab: &Lab) -> Result<Option<Undo<'_>>, libtest_mimic::Failed> {
    let undo = Undo {
        lab,
        host: "init",
        shell: "ip addr add 10.199.0.1/24 dev edge0 2>/dev/null; \
                ip addr del 10.199.0.2/24 dev edge0 2>/dev/null; true"
            .into(),
    };
    let out = lab.exec(
        "init",
        "sysctl -qw net.ipv4.conf.edge0.promote_secondaries=1 && \
         ip addr add 10.199.0.2/24 dev edge0 && ip addr del 10.199.0.1/24 dev edge0",
    );
    check!(
        out.status.success(),
        "changing the initiator's address: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(Some(undo))
}

/// Over QUIC, the initiator's address changes mid-run: the connection migrates (r1 validates
/// the new path), the link never goes down, and an edit made afterwards reaches the leaf with
/// nothing re-staged; r1's store connection, whose SSH tunnel died with the old address,
/// comes back through its socket over QUIC.
fn when_the_initiators_address_changes_the_quic_link_migrates(lab: &Lab) -> TestResult {
    link_survives(
        lab,
        Transport::Quic,
        &change_the_initiators_address,
        &|_, _| Ok(Vec::new()),
    )
}

/// Over QUIC, the sshd process of the initiator's connection to r1 is killed: the link, on
/// QUIC, goes on without it, and the store answers at r1's socket through QUIC.
fn when_the_ssh_connection_is_killed_the_quic_link_goes_on(lab: &Lab) -> TestResult {
    link_survives(
        lab,
        Transport::Quic,
        &|lab| {
            kill_the_ssh_connection_of(lab, "r1")?;
            Ok(None)
        },
        &|_, _| Ok(Vec::new()),
    )
}

/// Drops every UDP packet arriving at `host` (nftables in its namespace) until the returned
/// guard goes.
fn drop_udp_at<'a>(lab: &'a Lab, host: &'a str) -> Result<Undo<'a>, libtest_mimic::Failed> {
    let out = lab.exec(
        host,
        "nft add table inet arbor_test && \
         nft add chain inet arbor_test input '{ type filter hook input priority 0; }' && \
         nft add rule inet arbor_test input meta l4proto udp drop",
    );
    let undo = Undo {
        lab,
        host,
        shell: "nft delete table inet arbor_test 2>/dev/null; true".into(),
    };
    check!(
        out.status.success(),
        "dropping UDP at {host}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(undo)
}

/// Over QUIC a relay signs through the initiator's agent over the link itself, not through
/// the agent its SSH connection forwarded: r1's link to the initiator is on QUIC and its
/// link to l1-1 on SSH (UDP dropped at l1-1). The sshd of the initiator's connection to r1
/// is killed, and its forwarded agent goes with it; r1's link rides on over QUIC. Then the
/// sshd of r1's connection to l1-1 is killed: r1 re-attaches to l1-1 over a new SSH
/// connection, which it can log in with only through the agent on its QUIC link. Nothing
/// fails, and nothing is left.
fn on_quic_a_relay_logs_in_to_its_leaf_through_the_agent_on_its_link_without_its_ssh_connection(
    lab: &Lab,
) -> TestResult {
    clean(lab, false);
    let _undo = drop_udp_at(lab, "l1-1")?;
    let topo = topology(
        "defaults:\n  user: root\nhosts:\n- host: 10.199.0.11\n  name: r1\n  children:\n  - host: 10.199.1.11\n    name: l1-1\n    graph: {leaf}\n",
    );
    let (mut running, rx) = start_logging(
        lab,
        &topo,
        &["--link-timeout", "2", "--reconnect-grace", "30"],
    );
    let mut seen = wait_lines(
        &rx,
        &["r1/l1-1: converged".to_string()],
        Duration::from_secs(60),
    )?;
    let dir = lab.sh("r1", "ls -d /tmp/arbor.*").trim().to_string();
    let modes = lab.sh("r1", &format!("stat -c '%a %U' {dir}/agent.sock"));
    check!(
        modes == "600 root\n",
        "r1's agent socket on the link: {modes:?}\n{}",
        seen.join("\n")
    );
    kill_the_ssh_connection_of(lab, "r1")?;
    std::thread::sleep(Duration::from_secs(3));
    kill_the_ssh_connection_of(lab, "l1-1")?;
    seen.extend(wait_lines(
        &rx,
        &["l1-1: its link is back after".to_string()],
        Duration::from_secs(40),
    )?);
    check!(
        seen.iter().any(|l| l.contains(" r1 | ")
            && l.contains("l1-1: its link is back after")
            && l.contains("re-attached over a new SSH connection")),
        "r1 did not re-attach to l1-1 over a new SSH connection:\n{}",
        seen.join("\n")
    );
    let (code, _) = running.interrupt()?;
    seen.extend(rx.try_iter());
    let all = seen.join("\n");
    check!(code == Some(130), "exit {code:?} after ^C:\n{all}");
    check!(
        !seen
            .iter()
            .any(|l| l.contains("FAILED") || l.contains("r1: reconnecting")),
        "a host failed, or r1's link went down:\n{all}"
    );
    check!(
        seen.iter().any(|l| l.contains("links on QUIC: r1")),
        "the summary does not say r1's link ran on QUIC:\n{all}"
    );
    check_no_leftovers(lab, &["r1", "l1-1"])
}

/// UDP is dropped at r1 (nftables in its namespace): every QUIC handshake through it times
/// out, so r1's link and its leaves' stay on SSH, each within QUIC's 1 s connect timeout,
/// the run converges, and the summary says which links used SSH and why; r2's links,
/// untouched, run on QUIC. With `--transport quic`, r1 fails instead, and is stopped.
/// The QUIC ports a topology sets per host are where that child listens, for a relay and for
/// a leaf behind it: its UDP socket, seen on the host while the run is up.
fn a_topologys_quic_ports_are_where_each_child_listens_at_every_depth(lab: &Lab) -> TestResult {
    clean(lab, false);
    let topo = topology(
        "defaults:\n  user: root\nhosts:\n- host: 10.199.0.11\n  name: r1\n  quic_ports: 47110-47110\n  children:\n  - host: 10.199.1.11\n    name: l1-1\n    quic_ports: 47120-47120\n    graph: {leaf}\n",
    );
    let (mut running, _lines) = start(lab, &topo, &[]);
    // arbor's UDP sockets on the host, by port.
    let sockets = "ss -Huanp | grep '\"arbor\"' | grep -o ':4712[0-9]\\|:4711[0-9]' | sort -u";
    let r1 = wait_for(lab, "r1", sockets, ":47110", 30);
    let l1 = wait_for(lab, "l1-1", sockets, ":47120", 30);
    let (code, _) = running.interrupt()?;
    r1?;
    l1?;
    check!(code == Some(130), "exit {code:?} on ^C");
    check_no_leftovers(lab, &["r1", "l1-1"])
}

/// `--congestion`: Cubic unless told, and what it names at both ends of every link, at every
/// depth (each end says so in its debug log: the parent as the link moves onto QUIC, the
/// child as it takes the connection).
fn the_congestion_control_chosen_runs_at_both_ends_of_every_link(lab: &Lab) -> TestResult {
    clean(lab, false);
    let topo = topology(
        "defaults:\n  user: root\nhosts:\n- host: 10.199.0.11\n  name: r1\n  children:\n  - host: 10.199.1.11\n    name: l1-1\n    graph: {leaf}\n",
    );
    for (extra, want) in [(None, "cubic"), (Some("bbr"), "bbr")] {
        let mut args = vec!["--converged-timeout", "1", "-v"];
        if let Some(cc) = extra {
            args.extend(["--congestion", cc]);
        }
        args.extend(["--topology", topo.path.to_str().unwrap_or_default()]);
        args.push("--tmp-prefix");
        let out = arbor_command(lab, &lab.home(), &args)
            .env("ARBOR_LOG", "arbor=debug")
            .output()
            .map_err(fail)?;
        let log = exited(&out, 0)?;
        let ends = [
            (
                "the initiator, for r1",
                "DEBUG r1: the link moved onto QUIC",
            ),
            ("r1, for l1-1", "r1 | DEBUG l1-1: the link moved onto QUIC"),
            ("r1, as its link came", "r1 | DEBUG QUIC: the link runs on"),
            (
                "l1-1, as its link came",
                "r1/l1-1 | DEBUG QUIC: the link runs on",
            ),
        ];
        for (end, start) in ends {
            let line = log.lines().find(|l| l.contains(start)).unwrap_or_default();
            check!(
                line.ends_with(&format!("(congestion control: {want})")),
                "{end}: want {want}, the line is {line:?}\n{log}"
            );
        }
    }
    check_no_leftovers(lab, &["r1", "l1-1"])
}

fn when_udp_is_blocked_the_links_stay_on_ssh_and_converge(lab: &Lab) -> TestResult {
    clean(lab, false);
    let _undo = drop_udp_at(lab, "r1")?;
    let topo = topology(
        "defaults:\n  user: root\nhosts:\n- host: 10.199.0.11\n  name: r1\n  children:\n  - host: 10.199.1.11\n    name: l1-1\n    graph: {leaf}\n- host: 10.199.0.12\n  name: r2\n  children:\n  - host: 10.199.2.11\n    name: l2-1\n    graph: {leaf}\n",
    );
    let out = run(lab, &topo, &["--converged-timeout", "3"]);
    let said = text(&out);
    check!(
        out.status.code() == Some(0),
        "exit {:?}:\n{said}",
        out.status.code()
    );
    for name in ["r1", "r1/l1-1"] {
        let line = said
            .lines()
            .find(|l| l.contains(&format!(" {name}: link on SSH")))
            .unwrap_or_default();
        check!(
            line.contains("no QUIC handshake within 1s"),
            "{name}'s link does not say it stayed on SSH for want of a QUIC handshake:\n{said}"
        );
    }
    check!(
        said.lines()
            .any(|l| l.starts_with("links on QUIC: r2, r2/l2-1")),
        "r2's links did not run on QUIC:\n{said}"
    );
    check!(
        said.lines()
            .any(|l| l.starts_with("links on SSH (") && l.contains("r1")),
        "the summary does not say r1's link ran on SSH:\n{said}"
    );
    check_no_leftovers(lab, &["r1", "r2", "l1-1", "l2-1"])?;
    // QUIC or nothing: r1 fails, saying why, and is stopped; r2's subtree converges.
    let out = run(
        lab,
        &topo,
        &["--converged-timeout", "3", "--transport", "quic"],
    );
    let said = text(&out);
    check!(
        out.status.code() == Some(1),
        "exit {:?}:\n{said}",
        out.status.code()
    );
    check!(
        said.lines().any(|l| l.starts_with("r1 ")
            && l.contains(" failed ")
            && l.contains("no QUIC link (--transport quic)")),
        "r1 did not fail for want of QUIC:\n{said}"
    );
    check!(
        said.lines()
            .any(|l| l.starts_with("r2/l2-1 ") && l.contains(" ok ")),
        "r2's leaf did not converge:\n{said}"
    );
    check_no_leftovers(lab, &["r1", "r2", "l1-1", "l2-1"])
}

/// The sshd process of the initiator's connection to r1 is killed (r1's arbor is not): the
/// connection closes at once, and the initiator re-attaches over a new one.
fn when_the_ssh_connection_is_killed_the_parent_re_attaches_over_a_new_one(
    lab: &Lab,
) -> TestResult {
    re_attach_after(
        lab,
        &|lab| {
            kill_the_ssh_connection_of(lab, "r1")?;
            Ok(None)
        },
        &|_, _| Ok(Vec::new()),
    )
}

/// r1's connection is killed and the initiator re-attaches (r1's forwarded agent is now the
/// new connection's); then r1's connection to its leaf is killed: r1 re-attaches to l1-1 over
/// a new connection too, logging in through the agent the re-attach brought.
fn after_a_re_attach_a_relay_re_attaches_to_its_leaf_through_the_new_agent(
    lab: &Lab,
) -> TestResult {
    re_attach_after(
        lab,
        &|lab| {
            kill_the_ssh_connection_of(lab, "r1")?;
            Ok(None)
        },
        &|lab, rx| {
            kill_the_ssh_connection_of(lab, "l1-1")?;
            wait_lines(
                rx,
                &["l1-1: its link is back after".to_string()],
                Duration::from_secs(40),
            )
            .and_then(|seen| {
                check!(
                    seen.iter().any(|l| l.contains(" r1 | ")
                        && l.contains("l1-1: its link is back after")
                        && l.contains("re-attached over a new SSH connection")
                        && l.contains("none lost or repeated")),
                    "r1 did not re-attach to l1-1 with nothing lost or repeated:\n{}",
                    seen.join("\n")
                );
                Ok(seen)
            })
        },
    )
}

/// r1's re-attach socket is 0600 in its 0700 working dir: another user cannot connect to it.
/// A connection with a wrong token (through `arbor reattach` itself, as r1's user) is refused
/// and logged, and does not use the token up: the initiator still re-attaches when its
/// connection is killed afterwards.
fn a_wrong_re_attach_token_is_refused_and_the_socket_is_the_users_alone(lab: &Lab) -> TestResult {
    clean(lab, false);
    let topo = topology(
        "defaults:\n  user: root\nhosts:\n- host: 10.199.0.11\n  name: r1\n  children:\n  - host: 10.199.1.11\n    name: l1-1\n    graph: {leaf}\n",
    );
    // Over SSH alone: this is the re-attach over a fresh SSH connection.
    let (mut running, rx) = start_logging(
        lab,
        &topo,
        &[
            "--link-timeout",
            "2",
            "--reconnect-grace",
            "30",
            "--transport",
            "ssh",
        ],
    );
    let mut seen = wait_lines(
        &rx,
        &["r1/l1-1: converged".to_string()],
        Duration::from_secs(60),
    )?;
    let dir = lab.sh("r1", "ls -d /tmp/arbor.*").trim().to_string();
    let modes = lab.sh("r1", &format!("stat -c '%a %U' {dir} {dir}/reattach.sock"));
    check!(
        modes == "700 root\n600 root\n",
        "r1's working dir and re-attach socket: {modes:?}"
    );
    let other = lab.exec(
        "r1",
        &format!(
            "setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/python3 -c \
             'import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])' \
             {dir}/reattach.sock"
        ),
    );
    check!(
        !other.status.success()
            && String::from_utf8_lossy(&other.stderr).contains("Permission denied"),
        "another user could connect to r1's re-attach socket: {:?} {}",
        other.status.code(),
        String::from_utf8_lossy(&other.stderr)
    );
    let forged = lab.exec(
        "r1",
        &format!(
            "bin=$(readlink -f /proc/$(pgrep -x -o arbor)/exe); \
             /usr/bin/python3 -c 'import json, struct, sys; \
             b = json.dumps({{\"token\": \"0\" * 64, \"acked\": 0}}).encode(); \
             sys.stdout.buffer.write(struct.pack(\">I\", len(b)) + b)' \
             | timeout 10 \"$bin\" reattach --dir {dir}"
        ),
    );
    let answer = String::from_utf8_lossy(&forged.stdout);
    check!(
        answer.contains("\"type\":\"refused\"") && !answer.contains("resumed"),
        "a wrong token was not refused: {answer:?} {}",
        String::from_utf8_lossy(&forged.stderr)
    );
    let refused = wait_lines(
        &rx,
        &["re-attach refused: a wrong or already used token".to_string()],
        Duration::from_secs(10),
    )?;
    check!(
        refused.last().is_some_and(|l| l.contains(" r1 | ")),
        "the refusal is not r1's: {refused:?}"
    );
    seen.extend(refused);
    // The token was not used up: the real parent still re-attaches.
    kill_the_ssh_connection_of(lab, "r1")?;
    seen.extend(wait_lines(
        &rx,
        &["re-attached over a new SSH connection".to_string()],
        Duration::from_secs(40),
    )?);
    let (code, _) = running.interrupt()?;
    seen.extend(rx.try_iter());
    let all = seen.join("\n");
    check!(code == Some(130), "exit {code:?}:\n{all}");
    check!(
        !seen.iter().any(|l| l.contains("FAILED")),
        "a host failed:\n{all}"
    );
    check_no_leftovers(lab, &["r1", "l1-1"])
}

/// `2026-12-02T04:05:06.789Z rest`: a line that begins with arbor's UTC timestamp.
fn is_timestamped(line: &str) -> bool {
    let b = line.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    b.len() > 25
        && digits(0..4)
        && b[4] == b'-'
        && b[10] == b'T'
        && b[19] == b'.'
        && digits(20..23)
        && &b[23..25] == b"Z "
}

/// A rollout on a terminal (a tmux pane of 100 × 30, caches cold): while it runs the screen
/// shows the overall bar and a line per working host with its stage; at the end the bar
/// stands at 8/8 hosts, the converged hosts are folded into one nodeset and the summary
/// follows; no line is ever torn (a bar glued to a log line, or a bar line out of place).
fn on_a_terminal_a_live_view_shows_the_bar_host_stages_folded_hosts_and_the_summary(
    lab: &Lab,
) -> TestResult {
    clean(lab, true);
    let topo = topology(TWO_RELAYS);
    let term = Terminal::start(
        lab,
        &lab.home(),
        &[
            "--topology",
            &topo.path.to_string_lossy(),
            "--tmp-prefix",
            "--converged-timeout",
            "2",
        ],
    )?;
    let mut screens: Vec<String> = Vec::new();
    let history = term.until_exit(Duration::from_secs(120), |screen| {
        screens.push(screen.to_string());
    })?;
    let paths = [
        "r1", "r2", "r1/l1-1", "r1/l1-2", "r1/l1-3", "r2/l2-1", "r2/l2-2", "r2/l2-3",
    ];
    let host_line = |l: &str| {
        l.strip_prefix("  ")
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|p| paths.contains(&p))
            && l.split_whitespace().count() >= 2
    };
    check!(
        screens.iter().any(|s| s
            .lines()
            .any(|l| l.starts_with('[') && l.contains("/8 hosts"))
            && s.lines().any(host_line)),
        "no screen showed the overall bar and a host's line while it ran; last:\n{history}"
    );
    check!(
        history.contains("ARBOR-EXIT=0"),
        "the run did not exit 0:\n{history}"
    );
    check!(
        history
            .lines()
            .any(|l| l.starts_with('[') && l.contains(" 8/8 hosts")),
        "the bar never reached 8/8 hosts:\n{history}"
    );
    check!(
        history.lines().any(|l| l.contains("r1/l1-[1-3]")
            && l.contains("r2/l2-[1-3]")
            && l.trim_end().ends_with("converged")),
        "no folded line of converged hosts:\n{history}"
    );
    check!(
        history
            .lines()
            .any(|l| l.starts_with("HOST") && l.contains("RESULT"))
            && paths.iter().all(|p| history
                .lines()
                .any(|l| l.starts_with(&format!("{p} ")) && l.contains(" ok "))),
        "no summary with every host ok:\n{history}"
    );
    for screen in screens.iter().chain([&history]) {
        for l in screen.lines() {
            let bar_text = l.contains("/8 hosts");
            let torn = (bar_text && !l.starts_with('[')) || (l.starts_with('[') && !bar_text);
            check!(!torn, "a torn line: {l:?} in\n{screen}");
        }
    }
    check_no_leftovers(lab, &HOSTS)
}

/// A graph whose one file takes its content from `data.bin` beside it (a few MB of random
/// bytes, written here): the graph's path, and the data's sha256 and size.
struct ArtifactGraph {
    _dir: tempfile::TempDir,
    graph: PathBuf,
    sha256: String,
    size: u64,
}

/// Where the leaves write the artifact, and the mode they give it.
const ARTIFACT_TARGET: &str = "/tmp/from-artifact.bin";

fn random_bytes(n: usize) -> Result<Vec<u8>, libtest_mimic::Failed> {
    let mut data = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut data))
        .map_err(fail)?;
    Ok(data)
}

fn artifact_graph(megabytes: usize) -> Result<ArtifactGraph, libtest_mimic::Failed> {
    artifact_graph_of(random_bytes(megabytes << 20)?)
}

fn artifact_graph_of(data: Vec<u8>) -> Result<ArtifactGraph, libtest_mimic::Failed> {
    let dir = tempfile::tempdir().map_err(fail)?;
    let data_path = dir.path().join("data.bin");
    std::fs::write(&data_path, &data).map_err(fail)?;
    let graph = dir.path().join("artifact.yaml");
    std::fs::write(
        &graph,
        format!(
            "graph: artifact\nresources:\n  file:\n  - name: {ARTIFACT_TARGET}\n    \
             source: data.bin\n    mode: \"0640\"\n"
        ),
    )
    .map_err(fail)?;
    let sha256 = sha256_of(&data_path)?;
    Ok(ArtifactGraph {
        _dir: dir,
        graph,
        sha256,
        size: data.len() as u64,
    })
}

impl ArtifactGraph {
    fn data(&self) -> PathBuf {
        self._dir.path().join("data.bin")
    }
}

/// A rollout's graph beside `art`'s: its artifact owned by nobody:nogroup (by name and by
/// id), and `conf/`, a tree of 200 small files in 10 directories of mixed modes, copied to
/// /tmp/from-rollout/ owned by 65534:nogroup.
struct Rollout {
    graph: PathBuf,
    conf: PathBuf,
    /// The tree's files' bytes.
    bytes: u64,
}

fn rollout_graph(art: &ArtifactGraph) -> Result<Rollout, libtest_mimic::Failed> {
    use std::os::unix::fs::PermissionsExt;
    let dir = art
        .data()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let conf = dir.join("conf");
    let mut bytes = 0;
    for i in 0..200usize {
        let sub = conf.join(format!("d{}", i % 10));
        std::fs::create_dir_all(&sub).map_err(fail)?;
        let file = sub.join(format!("f{i:03}.conf"));
        let data = random_bytes(1024 + 7 * i)?;
        bytes += data.len() as u64;
        std::fs::write(&file, &data).map_err(fail)?;
        let mode = [0o640, 0o600, 0o755, 0o644][i % 4];
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).map_err(fail)?;
    }
    for i in 0..10 {
        let mode = if i % 2 == 0 { 0o750 } else { 0o755 };
        std::fs::set_permissions(
            conf.join(format!("d{i}")),
            std::fs::Permissions::from_mode(mode),
        )
        .map_err(fail)?;
    }
    let graph = dir.join("rollout.yaml");
    std::fs::write(
        &graph,
        format!(
            "graph: rollout\nresources:\n  file:\n  - name: {ARTIFACT_TARGET}\n    \
             source: data.bin\n    mode: \"0640\"\n    owner: nobody\n    group: \"65534\"\n  \
             - name: /tmp/from-rollout/\n    source: conf/\n    recurse: true\n    \
             owner: \"65534\"\n    group: nogroup\n"
        ),
    )
    .map_err(fail)?;
    Ok(Rollout { graph, conf, bytes })
}

/// Every entry of a tree, with its mode and type, and every file's sha256, as the same
/// command lists it here and on a host.
const LIST_TREE: &str = "find . -mindepth 1 -printf '%P %m %y\\n' | sort && \
                         find . -type f | sort | xargs sha256sum";

/// Every leaf holds the rollout's artifact owned by nobody:nogroup, and its tree as the
/// source has it (paths, modes, sha256s), the top directory owned by 65534:65534.
fn check_rollout_on(lab: &Lab, rollout: &Rollout, log: &str) -> TestResult {
    let want = Command::new("sh")
        .arg("-c")
        .arg(LIST_TREE)
        .current_dir(&rollout.conf)
        .output()
        .map_err(fail)?;
    let want = String::from_utf8_lossy(&want.stdout).into_owned();
    check!(want.lines().count() == 210 + 200, "the tree here: {want}");
    for leaf in LEAVES {
        let owners = lab.sh(
            leaf,
            &format!("stat -c %U:%G {ARTIFACT_TARGET}; stat -c %u:%g /tmp/from-rollout"),
        );
        check!(
            owners == "nobody:nogroup\n65534:65534\n",
            "{leaf}: owners {owners:?}\n{log}"
        );
        let got = lab.sh(leaf, &format!("cd /tmp/from-rollout && {LIST_TREE}"));
        check!(got == want, "{leaf}'s tree:\n{got}\nwant:\n{want}\n{log}");
    }
    Ok(())
}

/// Every leaf in `leaves` holds the artifact: its sha256 and mode 0640.
fn check_artifact_on(lab: &Lab, leaves: &[&str], art: &ArtifactGraph, log: &str) -> TestResult {
    for leaf in leaves {
        let got = lab.sh(
            leaf,
            &format!("sha256sum {ARTIFACT_TARGET} | cut -d' ' -f1; stat -c %a {ARTIFACT_TARGET}"),
        );
        let want = format!("{}\n640\n", art.sha256);
        check!(got == want, "{leaf}: got {got:?}, want {want:?}\n{log}");
    }
    Ok(())
}

/// The artifacts in a host's cache, by name.
fn cached_artifacts(lab: &Lab, host: &str) -> String {
    lab.sh(host, "ls /root/.cache/arbor/artifacts 2>/dev/null || true")
}

fn a_source_file_reaches_every_leaf_through_its_relay_once_per_relay_on_the_link(
    lab: &Lab,
) -> TestResult {
    clean(lab, true);
    // First only r1's leaves run a graph with a source: nothing of it goes to r2's subtree.
    // (This run also puts the binary in every cache, so the next run's link carries only
    // artifacts and the run's own traffic.)
    let first = artifact_graph(1)?;
    let mixed = TWO_RELAYS.replacen("{leaf}", &first.graph.to_string_lossy(), 1);
    let out = run(lab, &topology(&mixed), &["--converged-timeout", "2"]);
    let log = exited(&out, 0)?;
    check_artifact_on(lab, &["l1-1", "l1-2", "l1-3"], &first, &log)?;
    for host in ["r1", "l1-1", "l1-2", "l1-3"] {
        let cached = cached_artifacts(lab, host);
        check!(
            cached.trim() == first.sha256,
            "{host}'s artifacts cache holds {cached:?}, want {}",
            first.sha256
        );
    }
    for host in ["r2", "l2-1", "l2-2", "l2-3"] {
        let cached = cached_artifacts(lab, host);
        check!(
            cached.trim().is_empty(),
            "{host} needs no artifact but holds {cached:?}"
        );
        let file = lab.sh(host, &format!("ls {ARTIFACT_TARGET} 2>/dev/null || true"));
        check!(file.trim().is_empty(), "{host} has {file}");
    }

    // Then every leaf: a new 4 MiB artifact crosses the initiator's link once per relay.
    clean(lab, false);
    let art = artifact_graph(4)?;
    let topo = topology(&TWO_RELAYS.replace("{leaf}", &art.graph.to_string_lossy()));
    let (tx0, rx0) = lab.init_link_bytes();
    let out = run(lab, &topo, &["--converged-timeout", "2"]);
    let (tx1, rx1) = lab.init_link_bytes();
    let log = exited(&out, 0)?;
    check_artifact_on(lab, &LEAVES, &art, &log)?;
    for relay in ["r1", "r2"] {
        let file = lab.sh(relay, &format!("ls {ARTIFACT_TARGET} 2>/dev/null || true"));
        check!(
            file.trim().is_empty(),
            "{relay} runs no graph but has {file}"
        );
        let entry = lab.sh(
            relay,
            &format!(
                "sha256sum /root/.cache/arbor/artifacts/{} | cut -d' ' -f1",
                art.sha256
            ),
        );
        check!(entry.trim() == art.sha256, "{relay}'s cache entry: {entry}");
    }
    let sent = tx1 - tx0;
    eprintln!(
        "artifact of {} bytes, 2 relays x 3 leaves: the initiator's link carried {sent} bytes \
         out, {} in",
        art.size,
        rx1 - rx0
    );
    // Two copies and the run's own traffic; a third copy would be 4 MiB more.
    check!(
        sent >= 2 * art.size && sent < 2 * art.size + art.size / 2,
        "the initiator's link carried {sent} bytes out for a {}-byte artifact; want two \
         copies (one per relay), not six (one per leaf)\n{log}",
        art.size
    );
    check_no_leftovers(lab, &HOSTS)
}

fn a_corrupt_artifact_in_a_cache_is_detected_replaced_and_reported(lab: &Lab) -> TestResult {
    clean(lab, true);
    let art = artifact_graph(2)?;
    let topo = topology(&TWO_RELAYS.replace("{leaf}", &art.graph.to_string_lossy()));
    let out = run(lab, &topo, &["--converged-timeout", "2"]);
    let log = exited(&out, 0)?;
    check_artifact_on(lab, &LEAVES, &art, &log)?;

    // Between two runs, caches kept: r1's entry and l1-1's get other bytes of the same size
    // (only the sha256 tells), and the leaves' files go.
    clean(lab, false);
    let entry = format!("/root/.cache/arbor/artifacts/{}", art.sha256);
    for host in ["r1", "l1-1"] {
        lab.sh(
            host,
            &format!(
                "head -c {} /dev/urandom > {entry}.x && mv {entry}.x {entry}",
                art.size
            ),
        );
        let size = lab.sh(host, &format!("stat -c %s {entry}"));
        check!(size.trim() == art.size.to_string(), "{host}: {size}");
    }
    let out = run(lab, &topo, &["--converged-timeout", "2"]);
    let log = exited(&out, 0)?;
    check_artifact_on(lab, &LEAVES, &art, &log)?;
    // Reported: by the initiator for r1, by r1 (its log, tagged r1) for l1-1.
    for host in ["r1", "l1-1"] {
        let report = format!("{host}: artifact {} in its cache was corrupt", art.sha256);
        check!(log.contains(&report), "no {report:?} in the log\n{log}");
        let fixed = lab.sh(host, &format!("sha256sum {entry} | cut -d' ' -f1"));
        check!(
            fixed.trim() == art.sha256,
            "{host}'s cache entry was not replaced: {fixed}"
        );
    }
    check!(
        log.lines()
            .any(|l| l.contains("r1 | ") && l.contains("l1-1: artifact")),
        "l1-1's corrupt entry was not reported through r1\n{log}"
    );
    // Nothing else was reported corrupt.
    check!(
        log.matches("was corrupt").count() == 2,
        "more than two corrupt entries reported\n{log}"
    );
    check_no_leftovers(lab, &HOSTS)
}

fn under_no_caching_artifacts_go_into_working_dirs_and_leave_with_them(lab: &Lab) -> TestResult {
    clean(lab, true);
    let art = artifact_graph(1)?;
    let topo = topology(&TWO_RELAYS.replace("{leaf}", &art.graph.to_string_lossy()));
    let out = run(lab, &topo, &["--converged-timeout", "1", "--no-caching"]);
    let log = exited(&out, 0)?;
    check_artifact_on(lab, &LEAVES, &art, &log)?;
    for h in HOSTS {
        let cached = lab.sh(h, "ls -A /root/.cache/arbor 2>/dev/null || true");
        check!(
            cached.trim().is_empty(),
            "{h} kept {cached:?} in its cache under --no-caching\n{log}"
        );
    }
    // The working dirs, and the artifacts in them, are gone.
    check_no_leftovers(lab, &HOSTS)
}

/// The entries in a host's cache dir `sub` (`artifacts` or `bin`), sorted, one per line.
fn cache_entries(lab: &Lab, host: &str, sub: &str) -> String {
    lab.sh(
        host,
        &format!("ls /root/.cache/arbor/{sub} 2>/dev/null | sort || true"),
    )
}

fn a_small_cache_cap_evicts_the_older_artifact_and_build_at_depth_2(lab: &Lab) -> TestResult {
    clean(lab, true);
    let one_leaf = "\
defaults:
  user: root
hosts:
- host: 10.199.0.11
  name: r1
  children:
  - host: 10.199.1.11
    name: l1-1
    graph: {leaf}
";
    let cap = ["--converged-timeout", "1", "--cache-max-size", "1M"];
    // The initiator's own cache too: the builds and artifact copies it keeps for deltas.
    let own = lab.home().join(".cache/arbor");
    let own_entries = |sub: &str| {
        let mut names: Vec<String> = std::fs::read_dir(own.join(sub))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names.join("\n")
    };
    let _ = std::fs::remove_dir_all(&own);
    let first = artifact_graph(1)?;
    let out = run(
        lab,
        &topology(&one_leaf.replace("{leaf}", &first.graph.to_string_lossy())),
        &cap,
    );
    let log = exited(&out, 0)?;
    check_artifact_on(lab, &["l1-1"], &first, &log)?;
    // Used moments ago, so kept (a parent may just have checked it for a node yet to start).
    for host in ["r1", "l1-1"] {
        let cached = cache_entries(lab, host, "artifacts");
        check!(
            cached.trim() == first.sha256,
            "{host}: after the first run the cache holds {cached:?}\n{log}"
        );
    }
    let kept = own_entries("artifacts");
    check!(
        kept == first.sha256,
        "the initiator kept {kept:?} after the first run, want its copy of the artifact\n{log}"
    );
    // Time passes: every entry was last used two hours ago. The leaf also holds an old build
    // no run uses any more, and so does the initiator.
    let old_build = "0".repeat(64);
    lab.sh(
        "l1-1",
        &format!(
            "mkdir -p /root/.cache/arbor/bin/{old_build} && \
             head -c 4096 /dev/zero > /root/.cache/arbor/bin/{old_build}/arbor"
        ),
    );
    for host in ["r1", "l1-1"] {
        lab.sh(
            host,
            "find /root/.cache/arbor/artifacts /root/.cache/arbor/bin -mindepth 1 \
             -exec touch -h -d '2 hours ago' {} +",
        );
    }
    std::fs::create_dir_all(own.join("bin").join(&old_build)).map_err(fail)?;
    std::fs::write(own.join("bin").join(&old_build).join("arbor"), [0u8; 4096]).map_err(fail)?;
    let aged = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "find {0}/artifacts {0}/bin -mindepth 1 -exec touch -h -d '2 hours ago' {{}} +",
            own.display()
        ))
        .status()
        .map_err(fail)?;
    check!(aged.success(), "aging the initiator's cache failed");
    clean(lab, false);
    let second = artifact_graph(1)?;
    let out = run(
        lab,
        &topology(&one_leaf.replace("{leaf}", &second.graph.to_string_lossy())),
        &cap,
    );
    let log = exited(&out, 0)?;
    check_artifact_on(lab, &["l1-1"], &second, &log)?;
    for host in ["r1", "l1-1"] {
        // Only what the second run used is left: the first artifact went, least recently used.
        let cached = cache_entries(lab, host, "artifacts");
        check!(
            cached.trim() == second.sha256,
            "{host}: after the second run the cache holds {cached:?}, want only {}\n{log}",
            second.sha256
        );
        // The build that runs there is in use, so kept over the 1M cap; the old one went.
        let builds = cache_entries(lab, host, "bin");
        check!(
            builds.lines().count() == 1 && !builds.contains(&old_build),
            "{host}: builds left {builds:?}\n{log}"
        );
    }
    // The initiator bounds its own cache at the run's end: its copy of the first version
    // and the old build went, this run's copy and build stay.
    let kept = own_entries("artifacts");
    check!(
        kept == second.sha256,
        "the initiator's cache holds {kept:?} after the second run, want only {}\n{log}",
        second.sha256
    );
    let builds = own_entries("bin");
    check!(
        builds.lines().count() == 1 && !builds.contains(&old_build),
        "the initiator's builds left {builds:?}\n{log}"
    );
    check!(
        own_entries("leases").is_empty(),
        "the initiator's lease was left: {:?}",
        own_entries("leases")
    );
    check!(
        log.contains("cache: evicted"),
        "no eviction reported\n{log}"
    );
    check_no_leftovers(lab, &["r1", "l1-1"])?;
    // Each node's lease on what it used went with it.
    for host in ["r1", "l1-1"] {
        let leases = lab.sh(host, "ls -A /root/.cache/arbor/leases 2>/dev/null || true");
        check!(leases.trim().is_empty(), "{host}: leases left {leases:?}");
    }
    Ok(())
}

fn a_relay_that_finds_its_artifact_corrupt_when_serving_fetches_it_again(lab: &Lab) -> TestResult {
    clean(lab, true);
    // r1 runs a test build that zeroes the artifacts in its cache once its parent put them
    // there, before serving them (ARBOR_TEST_MISBEHAVE, honoured by debug builds only).
    lab.sh(
        "r1",
        "mkdir -p /root/.ssh && echo ARBOR_TEST_MISBEHAVE=corrupt-artifacts > /root/.ssh/environment",
    );
    let _undo = Undo {
        lab,
        host: "r1",
        shell: "rm -f /root/.ssh/environment".into(),
    };
    let art = artifact_graph(2)?;
    let topo = topology(&TWO_RELAYS.replace("{leaf}", &art.graph.to_string_lossy()));
    let (tx0, _) = lab.init_link_bytes();
    // Plain copies, so the bytes on the link count whole binaries and artifacts (the default
    // may gzip the binary and zstd the artifact, by the link's measured rate).
    let out = run(
        lab,
        &topo,
        &["--converged-timeout", "2", "--compress", "never"],
    );
    let (tx1, _) = lab.init_link_bytes();
    let log = exited(&out, 0)?;
    check!(
        log.contains(&format!("misbehaving: corrupted artifact {}", art.sha256)),
        "r1 did not corrupt its entry\n{log}"
    );
    let report = format!(
        "r1: artifact {} in this node's cache is corrupt ({} bytes with sha256 ",
        art.sha256, art.size
    );
    check!(
        log.contains(&report) && log.contains("fetching it again from the parent"),
        "no {report:?} in the log\n{log}"
    );
    // r1's link runs on QUIC (the default), so the fetch came on a stream of its own there.
    let over_quic = format!("r1: {} sent again over its QUIC link", &art.sha256[..12]);
    check!(
        log.contains(&over_quic),
        "no {over_quic:?} in the log\n{log}"
    );
    check_artifact_on(lab, &LEAVES, &art, &log)?;
    let entry = lab.sh(
        "r1",
        &format!(
            "sha256sum /root/.cache/arbor/artifacts/{} | cut -d' ' -f1",
            art.sha256
        ),
    );
    check!(entry.trim() == art.sha256, "r1's cache entry: {entry}");
    // r1 received it twice (staging, then the fetch), r2 once; the binaries were copied too.
    let binary = std::fs::metadata(ARBOR).map_err(fail)?.len();
    let sent = tx1 - tx0;
    eprintln!(
        "with r1's entry corrupted: {sent} bytes out, {binary}-byte binary, {}-byte artifact",
        art.size
    );
    check!(
        sent >= 2 * binary + 3 * art.size,
        "{sent} bytes out: fewer than 2 binaries and 3 copies of the artifact"
    );
    check_no_leftovers(lab, &HOSTS)
}

fn a_live_edit_may_reuse_a_source_but_adding_one_asks_for_a_restart(lab: &Lab) -> TestResult {
    clean(lab, false);
    let art = artifact_graph(1)?;
    let dir = art
        .graph
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    std::fs::write(dir.join("new.bin"), b"not sent at the start\n").map_err(fail)?;
    let version = |mode: &str, extra: &str| {
        format!(
            "graph: artifact\nresources:\n  file:\n  - name: {ARTIFACT_TARGET}\n    \
             source: data.bin\n    mode: \"{mode}\"\n{extra}"
        )
    };
    let topo = topology(&format!(
        "defaults:\n  user: root\nhosts:\n- host: 10.199.0.11\n  name: r1\n  children:\n  - host: 10.199.1.11\n    name: l1-1\n    graph: {}\n",
        art.graph.display()
    ));
    let (mut running, rx) = start_logging(lab, &topo, &[]);
    wait_lines(
        &rx,
        &["r1/l1-1: converged".to_string()],
        Duration::from_secs(60),
    )?;
    check_artifact_on(lab, &["l1-1"], &art, "")?;
    let mode = || lab.sh("l1-1", &format!("stat -c %a {ARTIFACT_TARGET}"));
    // An edit that keeps the source: applied.
    std::fs::write(&art.graph, version("0600", "")).map_err(fail)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while mode().trim() != "600" {
        check!(Instant::now() < deadline, "l1-1's mode stayed {}", mode());
        std::thread::sleep(Duration::from_millis(50));
    }
    // An edit that adds a source: refused at its place, naming the host and the restart.
    std::fs::write(
        &art.graph,
        version("0644", "  - name: /tmp/from-new.bin\n    source: new.bin\n"),
    )
    .map_err(fail)?;
    let refused = format!(
        "{}:8:13: source `new.bin` is new to l1-1: artifacts are copied when the run starts, \
         so adding a source needs a restart of the run",
        art.graph.display()
    );
    wait_lines(&rx, std::slice::from_ref(&refused), Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_millis(300));
    check!(
        mode().trim() == "600",
        "the refused edit changed l1-1: {}",
        mode()
    );
    let new = lab.sh("l1-1", "ls /tmp/from-new.bin 2>/dev/null; true");
    check!(new.trim().is_empty(), "l1-1 has {new}");
    let status = stop_with(&mut running, libc::SIGINT)?;
    check!(status.code() == Some(130), "exit {:?}", status.code());
    Ok(())
}

/// The operator's only key is encrypted and no agent runs: with --allow-interactive the
/// passphrase is asked once on the terminal for the whole run (both relays, and the
/// in-process agent that signs for the leaves at depth 2), then every host converges.
fn an_encrypted_keys_passphrase_is_asked_once_per_run(lab: &Lab) -> TestResult {
    clean(lab, false);
    let topo = topology(TWO_RELAYS);
    let home = tempfile::tempdir().expect("tempdir");
    let ssh = home.path().join(".ssh");
    std::fs::create_dir_all(&ssh).expect("mkdir");
    std::fs::copy(lab.home().join(".ssh/known_hosts"), ssh.join("known_hosts")).expect("copy");
    let key = ssh.join("id_ed25519");
    std::fs::copy(lab.home().join(".ssh/id_ed25519"), &key).expect("copy");
    support::local(
        "ssh-keygen",
        &[
            "-q",
            "-p",
            "-P",
            "",
            "-N",
            "open sesame",
            "-f",
            &key.to_string_lossy(),
        ],
    );
    let term = Terminal::start(
        lab,
        home.path(),
        &[
            "--topology",
            &topo.path.to_string_lossy(),
            "--tmp-prefix",
            "--allow-interactive",
            "--converged-timeout",
            "2",
        ],
    )?;
    let mut asked = 0;
    let history = term.until_exit(Duration::from_secs(120), |screen| {
        let prompts = screen.matches("Enter passphrase for key").count();
        if prompts > asked && screen.trim_end().ends_with(':') {
            asked = prompts;
            term.type_line("open sesame");
        }
    })?;
    check!(
        history.contains("ARBOR-EXIT=0"),
        "the run did not exit 0:\n{history}"
    );
    check!(
        history.matches("Enter passphrase for key").count() == 1,
        "the passphrase was not asked exactly once:\n{history}"
    );
    check!(
        !history.contains("open sesame"),
        "the passphrase was echoed:\n{history}"
    );
    for leaf in ["r1/l1-1", "r2/l2-3"] {
        check!(
            history
                .lines()
                .any(|l| l.starts_with(&format!("{leaf} ")) && l.contains(" ok ")),
            "{leaf} did not converge:\n{history}"
        );
    }
    check_no_leftovers(lab, &HOSTS)
}

/// Caches cold, then warm: the second run reports every host's binary as found in its cache,
/// never as copied, and the summary counts no binary's bytes for any host, leaves included.
fn a_second_run_says_every_binary_came_from_the_cache_and_counts_no_copy(lab: &Lab) -> TestResult {
    clean(lab, true);
    let topo = topology(TWO_RELAYS);
    exited(&run(lab, &topo, &["--converged-timeout", "1"]), 0)?;
    let out = run(lab, &topo, &["--converged-timeout", "1"]);
    let log = exited(&out, 0)?;
    let paths = [
        "r1", "r2", "r1/l1-1", "r1/l1-2", "r1/l1-3", "r2/l2-1", "r2/l2-2", "r2/l2-3",
    ];
    for p in paths {
        check!(
            log.contains(&format!(" {p}: arbor already in the host's cache"))
                && !log.contains(&format!(" {p}: copied arbor")),
            "{p}: not reported as a cache hit alone\n{log}"
        );
        let row = log
            .lines()
            .skip_while(|l| !(l.starts_with("HOST") && l.contains("RESULT")))
            .find(|l| l.starts_with(&format!("{p} ")))
            .unwrap_or("");
        // HOST RESULT TIME SENT(number unit) CACHED
        let cols: Vec<&str> = row.split_whitespace().collect();
        check!(
            cols.len() >= 6 && cols[5] == "yes" && matches!(cols[4], "B" | "kB"),
            "{p}: summary row {row:?} does not say cached with no binary sent\n{log}"
        );
    }
    check_no_leftovers(lab, &HOSTS)
}

/// r2 runs dropbear, which forwards no Unix sockets, so its store tunnel ends on a loopback
/// TCP port that any local process can reach. During the run, Debian's etcdctl on r2 reaches
/// that port and the store itself refuses it everything without the host's credential
/// (as etcd does: "user name is empty", not a refused connection): reading every key,
/// writing, deleting.
fn a_local_process_on_a_tcp_fallback_host_cannot_use_the_store_tunnel(lab: &Lab) -> TestResult {
    clean(lab, false);
    let topo = topology(TWO_RELAYS);
    let (mut running, rx) = start_logging(lab, &topo, &[]);
    let seen = wait_lines(
        &rx,
        &[
            "r2: the store tunnel ends on loopback TCP port".to_string(),
            "r2/l2-1: converged".to_string(),
        ],
        Duration::from_secs(90),
    )?;
    let port: u16 = seen
        .iter()
        .find_map(|l| {
            l.split("r2: the store tunnel ends on loopback TCP port ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .ok_or_else(|| fail(format!("no port in the warning:\n{}", seen.join("\n"))))?;
    for (what, args) in [
        ("reading every key", "get --prefix /"),
        ("writing", "put /run/exports/evil x"),
        ("deleting every key", "del --prefix /"),
    ] {
        let out = lab.exec(
            "r2",
            &format!(
                "ETCDCTL_API=3 etcdctl --endpoints=127.0.0.1:{port} --command-timeout=5s {args}"
            ),
        );
        let said = text(&out);
        check!(
            !out.status.success(),
            "{what} through r2's tunnel port without a credential worked:\n{said}"
        );
        check!(
            [
                "user name is empty",
                "permission denied",
                "invalid auth token"
            ]
            .iter()
            .any(|m| said.contains(m)),
            "{what}: no refusal from the store on port {port}:\n{said}"
        );
    }
    let (code, _) = running.interrupt()?;
    check!(code == Some(130), "exit {code:?} after ^C");
    check_no_leftovers(lab, &HOSTS)
}

/// Runs `command` to its end, as `Command::output`, but stops it (^C, then SIGKILL) and fails
/// if it has not ended within `limit`.
fn output_within(mut command: Command, limit: Duration) -> Result<Output, libtest_mimic::Failed> {
    let files = tempfile::tempdir().map_err(fail)?;
    let (out, err) = (files.path().join("out"), files.path().join("err"));
    let child = command
        .stdout(std::fs::File::create(&out).map_err(fail)?)
        .stderr(std::fs::File::create(&err).map_err(fail)?)
        .spawn()
        .map_err(fail)?;
    let mut running = Running(child);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = running.0.try_wait().map_err(fail)? {
            break status;
        }
        if started.elapsed() > limit {
            drop(running);
            let so_far = std::fs::read_to_string(&out).unwrap_or_default();
            return Err(fail(format!("still running after {limit:?}:\n{so_far}")));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Output {
        status,
        stdout: std::fs::read(&out).map_err(fail)?,
        stderr: std::fs::read(&err).map_err(fail)?,
    })
}

/// l1-1, under r1, runs a 1 s timer with a notify edge to an exec that appends the time to a
/// file. For 5 s after its first run the exec must run about once a second: at least 4 more
/// times, at most 7, never twice within half a second (a tick refreshes it once).
fn a_timer_drives_an_exec_at_depth_2_through_a_relay(lab: &Lab) -> TestResult {
    clean(lab, false);
    let dir = tempfile::tempdir().map_err(fail)?;
    let graph = dir.path().join("timer.yaml");
    std::fs::write(
        &graph,
        "graph: ticks\nresources:\n  timer:\n  - name: t\n    interval: 1\n  exec:\n  \
         - name: stamp\n    cmd: date +%s.%N >> /tmp/from-timer\nedges:\n- name: e\n  \
         from: {kind: timer, name: t}\n  to: {kind: exec, name: stamp}\n  notify: true\n",
    )
    .map_err(fail)?;
    let topo = topology(&format!(
        "defaults:\n  user: root\nhosts:\n- host: 10.199.0.11\n  name: r1\n  children:\n  \
         - host: 10.199.1.11\n    name: l1-1\n    graph: {}\n",
        graph.display()
    ));
    let (mut running, _rx) = start(lab, &topo, &[]);
    let stamps = || lab.sh("l1-1", "cat /tmp/from-timer 2>/dev/null || true");
    let deadline = Instant::now() + Duration::from_secs(60);
    while stamps().trim().is_empty() {
        check!(
            Instant::now() < deadline,
            "the exec never ran on l1-1 within 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(5));
    let seen = stamps();
    let (code, _) = running.interrupt()?;
    check!(code == Some(130), "exit {code:?} after ^C");
    let times: Vec<f64> = seen
        .lines()
        .map(|l| l.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|e| fail(format!("{e}: {seen}")))?;
    let runs = times.len();
    check!(
        (5..=8).contains(&runs),
        "the exec ran {runs} times in 5 s after its first run of a 1 s timer:\n{seen}"
    );
    let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    check!(
        gaps.iter().all(|g| *g >= 0.5),
        "runs closer than half a second apart: {gaps:?}"
    );
    check_no_leftovers(lab, &["r1", "l1-1"])
}

/// l1-1 (under r1) sets its kv key `color` to blue. l2-1 (under r2) runs a test build whose kv
/// resources act on l1-1's keys (`ARBOR_TEST_MISBEHAVE=kv-as:l1-1`, as a compromised host
/// could), with l2-1's own store credential: it reads l1-1's value, and its attempt to make it
/// red is refused by the store. The run exits 1 naming that failure, and the store, opened
/// after the run with `arbor store` and read with Debian's etcdctl, still holds blue under
/// l1-1's own prefix: kv keys outlive the run, as mgmt's do.
fn a_kv_written_at_depth_2_is_read_by_another_host_that_cannot_overwrite_it(
    lab: &Lab,
) -> TestResult {
    clean(lab, false);
    lab.sh(
        "l2-1",
        "mkdir -p /root/.ssh && echo ARBOR_TEST_MISBEHAVE=kv-as:l1-1 > /root/.ssh/environment",
    );
    let _undo = Undo {
        lab,
        host: "l2-1",
        shell: "rm -f /root/.ssh/environment".into(),
    };
    let dir = tempfile::tempdir().map_err(fail)?;
    let graph = |name: &str, value: &str| -> Result<String, libtest_mimic::Failed> {
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &path,
            format!("graph: {name}\nresources:\n  kv:\n  - name: color\n    value: {value}\n"),
        )
        .map_err(fail)?;
        Ok(path.display().to_string())
    };
    let (blue, red) = (graph("blue", "blue")?, graph("red", "red")?);
    let topo = topology(&format!(
        "defaults:\n  user: root\nhosts:\n- host: 10.199.0.11\n  name: r1\n  children:\n  \
         - host: 10.199.1.11\n    name: l1-1\n    graph: {blue}\n- host: 10.199.0.12\n  \
         name: r2\n  children:\n  - host: 10.199.2.11\n    name: l2-1\n    graph: {red}\n"
    ));
    // The store persists under this HOME (no --tmp-prefix), to be read after the run.
    let home = private_home(lab)?;
    let state = home.path().join(".local/state");
    let mut run = arbor_command(
        lab,
        home.path(),
        &[
            "--topology",
            topo.path.to_str().unwrap_or_default(),
            "--converged-timeout",
            "2",
        ],
    );
    run.env("XDG_STATE_HOME", &state);
    // Were the write allowed, the two hosts would set the key back and forth for ever.
    let out = output_within(run, Duration::from_secs(90))?;
    let log = exited(&out, 1)?;
    let refused = log.lines().any(|l| {
        l.contains("l2-1")
            && l.contains("kv[color]")
            && l.contains("set /arbor/kv/l1-1/color to `red` (it is `blue`)")
            && l.contains("permission denied")
    });
    check!(
        refused,
        "no refusal of l2-1 overwriting l1-1's blue seen\n{log}"
    );
    check!(
        log.lines()
            .any(|l| l.starts_with("r1/l1-1 ") && l.contains(" ok ")),
        "l1-1's own kv did not end ok\n{log}"
    );
    // l2-1's arbor ended cleanly, but its kv failed: its summary row says failed, and why.
    check!(
        log.lines().any(|l| l.starts_with("r2/l2-1 ")
            && l.contains(" failed ")
            && l.contains("settled with failures: kv[color]")),
        "l2-1's summary row does not say it failed\n{log}"
    );
    // The run is over: open its store and read every kv key.
    let port = "23795";
    let store = Command::new("ip")
        .args(["netns", "exec", lab.init_ns(), ARBOR, "store", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(state.join("arbor/store"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(fail)?;
    let _store = Running(store);
    let get = || {
        Command::new("ip")
            .args(["netns", "exec", lab.init_ns(), "/usr/bin/etcdctl"])
            .arg(format!("--endpoints=127.0.0.1:{port}"))
            .args(["--command-timeout=5s", "get", "--prefix", "/arbor/kv/"])
            .env("ETCDCTL_API", "3")
            .output()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let got = loop {
        let out = get().map_err(fail)?;
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        check!(
            Instant::now() < deadline,
            "etcdctl never read the run's store:\n{}",
            text(&out)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    check!(
        got == "/arbor/kv/l1-1/color\nblue\n",
        "the store's kv keys after the run:\n{got}\n{log}"
    );
    check_no_leftovers(lab, &HOSTS)
}

/// A lab of its own (`treesys<pid>`): r1 and its leaf l1-1, with `lab_args` (`--own-root
/// l1-1`, `--init l1-1`). Dropping it tears it down, whether the test passed, failed or
/// panicked. The tree lab's hosts share the machine's /etc; these tests change a host's.
fn own_root_lab(lab_args: &[&str]) -> Lab {
    let mut args = vec!["--relays", "1", "--leaves", "1"];
    args.extend_from_slice(lab_args);
    Lab::up("treesys", &args)
}

/// One graph on l1-1 under r1, as a topology.
fn leaf_topology(dir: &Path, graph: &str) -> Result<Topo, libtest_mimic::Failed> {
    let path = dir.join("graph.yaml");
    std::fs::write(&path, graph).map_err(fail)?;
    Ok(topology(&format!(
        "defaults:\n  user: root\nhosts:\n- host: 10.199.0.11\n  name: r1\n  children:\n  \
         - host: 10.199.1.11\n    name: l1-1\n    graph: {}\n",
        path.display()
    )))
}

/// Runs `shell` on `host` until its output (trimmed) is `want`, for up to `secs` seconds.
fn wait_for(lab: &Lab, host: &str, shell: &str, want: &str, secs: u64) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let out = lab.exec(host, shell);
        let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if got == want {
            return Ok(());
        }
        check!(
            Instant::now() < deadline,
            "`{shell}` on {host} gave `{got}`, not `{want}`, within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// On l1-1 (under r1), a host with a root of its own, a graph makes the group `arbor-g`
/// (gid 4711) and the user `arbor-u` (uid 4712, primary group `arbor-g` by name: the
/// automatic edge orders them, shell, home) with the host's useradd and groupadd: `getent`
/// on l1-1 shows them, the machine's /etc/passwd and /etc/group do not. Deleting the user by
/// hand (`userdel`) is undone by the running graph within seconds (inotify on /etc/passwd).
fn a_user_and_group_made_at_depth_2_on_an_own_root_host_come_back_when_deleted(
    _tree: &Lab,
) -> TestResult {
    let lab = own_root_lab(&["--own-root", "l1-1"]);
    let lab = &lab;
    let dir = tempfile::tempdir().map_err(fail)?;
    let topo = leaf_topology(
        dir.path(),
        "graph: accounts\nresources:\n  user:\n  - name: arbor-u\n    state: exists\n    \
         uid: 4712\n    group: arbor-g\n    shell: /bin/bash\n    homedir: /home/arbor-u/\n  \
         group:\n  - name: arbor-g\n    state: exists\n    gid: 4711\n",
    )?;
    let (mut running, rx) = start_logging(lab, &topo, &[]);
    let want_user = "arbor-u:x:4712:4711::/home/arbor-u:/bin/bash";
    wait_for(lab, "l1-1", "getent passwd arbor-u", want_user, 60)?;
    wait_for(lab, "l1-1", "getent group arbor-g", "arbor-g:x:4711:", 5)?;
    for (file, name) in [("/etc/passwd", "arbor-u:"), ("/etc/group", "arbor-g:")] {
        let machine = std::fs::read_to_string(file).map_err(fail)?;
        check!(
            !machine.lines().any(|l| l.starts_with(name)),
            "the machine's {file} has {name}: the own root leaked"
        );
    }
    // Drift: the user is deleted by hand; the graph puts it back (so fast that `getent` right
    // after userdel may already find it again: the log says it was added a second time).
    lab.sh("l1-1", "userdel arbor-u");
    let mut log = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while log
        .iter()
        .filter(|l: &&String| l.contains("add user arbor-u"))
        .count()
        < 2
    {
        check!(
            Instant::now() < deadline,
            "arbor-u was not added again within 15 s of userdel:\n{}",
            log.join("\n")
        );
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            log.push(line);
        }
    }
    wait_for(lab, "l1-1", "getent passwd arbor-u", want_user, 10)?;
    let (code, _) = running.interrupt()?;
    check!(code == Some(130), "exit {code:?} after ^C");
    check_no_leftovers(lab, &["r1", "l1-1"])
}

/// On l1-1 (under r1), booted with systemd (`--init`), a hostname resource sets the pretty,
/// static and transient names through hostnamectl: `hostname` on l1-1 says the new name,
/// `hostnamectl` agrees, /etc/hostname holds it. A name set by hand (`hostname other`,
/// which only the kernel hears of) is put back within seconds.
fn the_host_name_is_set_at_depth_2_on_a_systemd_host_and_put_back_when_changed(
    _tree: &Lab,
) -> TestResult {
    let lab = own_root_lab(&["--init", "l1-1"]);
    let lab = &lab;
    check!(
        lab.sh("l1-1", "systemctl is-system-running || true").trim() == "running",
        "l1-1 is not a running systemd host"
    );
    let dir = tempfile::tempdir().map_err(fail)?;
    let topo = leaf_topology(
        dir.path(),
        "graph: names\nresources:\n  hostname:\n  - name: web\n    hostname: arbor-web-1\n    \
         pretty_hostname: Arbor Web One\n",
    )?;
    let (mut running, _rx) = start(lab, &topo, &[]);
    wait_for(lab, "l1-1", "hostname", "arbor-web-1", 60)?;
    wait_for(lab, "l1-1", "cat /etc/hostname", "arbor-web-1", 5)?;
    wait_for(
        lab,
        "l1-1",
        "hostnamectl --pretty hostname",
        "Arbor Web One",
        5,
    )?;
    wait_for(
        lab,
        "l1-1",
        "hostnamectl --static hostname",
        "arbor-web-1",
        5,
    )?;
    // Drift the kernel's name only: no file changes, hostnamed is not involved.
    lab.sh("l1-1", "hostname other-name");
    wait_for(lab, "l1-1", "hostname", "arbor-web-1", 10)?;
    let machine = std::fs::read_to_string("/etc/hostname").map_err(fail)?;
    check!(
        !machine.contains("arbor-web-1"),
        "the machine's /etc/hostname changed: {machine}"
    );
    let (code, _) = running.interrupt()?;
    check!(code == Some(130), "exit {code:?} after ^C");
    check_no_leftovers(lab, &["r1", "l1-1"])
}

/// On l1-1 (under r1), with a root of its own but no systemd, arbor sets the names itself:
/// /etc/hostname, PRETTY_HOSTNAME in /etc/machine-info (other lines kept) and the kernel's
/// name. Editing /etc/hostname by hand is put back (inotify); the machine's files are not
/// touched.
fn without_systemd_the_host_name_is_written_and_set_by_arbor_at_depth_2(_tree: &Lab) -> TestResult {
    let lab = own_root_lab(&["--own-root", "l1-1"]);
    let lab = &lab;
    lab.sh(
        "l1-1",
        "test ! -d /run/systemd/system && echo 'ICON_NAME=computer-vm' > /etc/machine-info",
    );
    let dir = tempfile::tempdir().map_err(fail)?;
    let topo = leaf_topology(
        dir.path(),
        "graph: names\nresources:\n  hostname:\n  - name: plain-1\n    \
         pretty_hostname: \"Plain \\\"One\\\"\"\n",
    )?;
    let (mut running, _rx) = start(lab, &topo, &[]);
    wait_for(lab, "l1-1", "hostname", "plain-1", 60)?;
    wait_for(lab, "l1-1", "cat /etc/hostname", "plain-1", 5)?;
    wait_for(
        lab,
        "l1-1",
        "cat /etc/machine-info",
        "ICON_NAME=computer-vm\nPRETTY_HOSTNAME=\"Plain \\\"One\\\"\"",
        5,
    )?;
    lab.sh("l1-1", "echo drifted > /etc/hostname");
    wait_for(lab, "l1-1", "cat /etc/hostname", "plain-1", 10)?;
    for file in ["/etc/hostname", "/etc/machine-info"] {
        let machine = std::fs::read_to_string(file).unwrap_or_default();
        check!(
            !machine.contains("plain-1") && !machine.contains("Plain"),
            "the machine's {file} changed: {machine}"
        );
    }
    let (code, _) = running.interrupt()?;
    check!(code == Some(130), "exit {code:?} after ^C");
    check_no_leftovers(lab, &["r1", "l1-1"])
}

/// A user with a field mgmt does not have (`homdir`) is bad input: the run exits 2 naming the
/// graph file, line and column, before any host is contacted.
fn an_unknown_user_field_exits_2_with_its_place(lab: &Lab) -> TestResult {
    let dir = tempfile::tempdir().map_err(fail)?;
    let topo = leaf_topology(
        dir.path(),
        "graph: accounts\nresources:\n  user:\n  - name: arbor-u\n    state: exists\n    \
         homdir: /home/arbor-u/\n",
    )?;
    let out = output_within(
        {
            let mut c = arbor_command(
                lab,
                &lab.home(),
                &[
                    "--topology",
                    topo.path.to_str().unwrap_or_default(),
                    "--tmp-prefix",
                ],
            );
            c.stdin(Stdio::null());
            c
        },
        Duration::from_secs(30),
    )?;
    let log = exited(&out, 2)?;
    let place = format!("{}:6:5:", dir.path().join("graph.yaml").display());
    check!(
        log.lines()
            .any(|l| l.contains(&place) && l.contains("homdir")),
        "no `{place} … homdir` in\n{log}"
    );
    Ok(())
}

/// The test package, never one of the machine's.
const TEST_PKG: &str = "arbor-lab-hello";

/// Builds `arbor-lab-hello_<v>_all.deb` for each version into `dir` (with `dpkg-deb`), and
/// with `repo`, a flat repository's `Packages` index beside them (`dpkg-scanpackages`).
fn build_debs(dir: &Path, versions: &[&str], repo: bool) -> TestResult {
    for v in versions {
        let root = dir.join(format!("build-{v}"));
        std::fs::create_dir_all(root.join("DEBIAN")).map_err(fail)?;
        std::fs::create_dir_all(root.join("usr/share/arbor-lab-hello")).map_err(fail)?;
        std::fs::write(
            root.join("DEBIAN/control"),
            format!(
                "Package: {TEST_PKG}\nVersion: {v}\nArchitecture: all\nMaintainer: arbor tests \
                 <tests@arbor.invalid>\nSection: misc\nPriority: optional\nDescription: a \
                 package arbor's tests install\n"
            ),
        )
        .map_err(fail)?;
        std::fs::write(root.join("usr/share/arbor-lab-hello/version"), v).map_err(fail)?;
        let out = Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&root)
            .arg(dir.join(format!("{TEST_PKG}_{v}_all.deb")))
            .output()
            .map_err(fail)?;
        check!(out.status.success(), "dpkg-deb --build: {}", text(&out));
        std::fs::remove_dir_all(&root).map_err(fail)?;
    }
    if repo {
        let out = Command::new("dpkg-scanpackages")
            .args(["--multiversion", ".", "/dev/null"])
            .current_dir(dir)
            .output()
            .map_err(fail)?;
        check!(out.status.success(), "dpkg-scanpackages: {}", text(&out));
        std::fs::write(dir.join("Packages"), &out.stdout).map_err(fail)?;
    }
    Ok(())
}

/// Copies every file of `from` into `to` on a lab host (through `lab exec`, as tar).
fn put_dir(lab: &Lab, host: &str, from: &Path, to: &str) -> TestResult {
    let tar = Command::new("tar")
        .arg("-C")
        .arg(from)
        .args(["-cf", "-", "."])
        .output()
        .map_err(fail)?;
    check!(tar.status.success(), "tar: {}", text(&tar));
    let mut child = Command::new(support::repo_root().join("integration/lab"))
        .args(["exec", "--name", &lab.name, host, "sh", "-c"])
        .arg(format!("mkdir -p {to} && tar -C {to} -xf -"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(fail)?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(&tar.stdout).map_err(fail)?;
    }
    let out = child.wait_with_output().map_err(fail)?;
    check!(out.status.success(), "untar on {host}: {}", text(&out));
    Ok(())
}

/// The one-leaf topology: r2, and under it the system host running `graph`.
fn system_host_topology(lab: &Lab, graph: &Path) -> Topo {
    topology(&format!(
        "defaults:\n  user: root\nhosts:\n- host: 10.199.0.12\n  name: r2\n  children:\n  \
         - host: {}\n    name: {SYSTEM_HOST}\n    graph: {}\n",
        lab.addr(SYSTEM_HOST),
        graph.display()
    ))
}

/// The test package's version installed on the system host, or "" if it is not installed.
fn installed_version(lab: &Lab) -> String {
    lab.sh(
        SYSTEM_HOST,
        &format!(
            "dpkg-query -W -f '${{db:Status-Status}} ${{Version}}' {TEST_PKG} 2>/dev/null \
             | sed -n 's/^installed //p'"
        ),
    )
    .trim()
    .to_string()
}

/// Waits until `f` is true, failing with `what` after `limit`.
fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> TestResult {
    let deadline = Instant::now() + limit;
    while !f() {
        check!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Takes the host's package out, and its apt sources back to the machine's, however the test
/// ends.
fn undo_packages(lab: &Lab) -> Undo<'_> {
    Undo {
        lab,
        host: SYSTEM_HOST,
        shell: format!(
            "dpkg --purge {TEST_PKG} >/dev/null 2>&1; rm -rf /srv/arbor-repo \
             /etc/apt/sources.list.d/arbor-lab.list /var/lib/apt/lists/_srv_arbor-repo_*; \
             if [ -e /etc/apt/debian.sources.arbor-test ]; then mv \
             /etc/apt/debian.sources.arbor-test /etc/apt/sources.list.d/debian.sources; fi"
        ),
    }
}

/// l2-3 (its own root, under r2) has one apt source, a flat repository on its own disk
/// (`file:`) holding versions 1.0 and 2.0 of a test package, and apt has never read it: the
/// pkg resource (state `installed`) finds no candidate, runs `apt-get update` once and installs
/// the newest. Then the package is removed by hand (`dpkg --remove`): the watch on dpkg's
/// status file sees it and the next check installs it again. Live edits then pin version 1.0
/// (a downgrade, with `allowdowngrade`) and make it `uninstalled`.
fn a_package_from_a_local_repository_is_installed_at_depth_2_and_put_back_when_removed_by_hand(
    lab: &Lab,
) -> TestResult {
    clean(lab, false);
    let _undo = undo_packages(lab);
    let repo = tempfile::tempdir().map_err(fail)?;
    build_debs(repo.path(), &["1.0", "2.0"], true)?;
    put_dir(lab, SYSTEM_HOST, repo.path(), "/srv/arbor-repo")?;
    // Only the local repository: the machine's mirrors are unreachable from the lab (an
    // update would wait on DNS for them).
    lab.sh(
        SYSTEM_HOST,
        "mv /etc/apt/sources.list.d/debian.sources /etc/apt/debian.sources.arbor-test \
         2>/dev/null; echo 'deb [trusted=yes] file:/srv/arbor-repo ./' > \
         /etc/apt/sources.list.d/arbor-lab.list",
    );
    check!(
        installed_version(lab).is_empty(),
        "{TEST_PKG} is installed before the test"
    );
    let dir = tempfile::tempdir().map_err(fail)?;
    let graph = dir.path().join("pkg.yaml");
    std::fs::write(
        &graph,
        format!("graph: pkg\nresources:\n  pkg:\n  - name: {TEST_PKG}\n    state: installed\n"),
    )
    .map_err(fail)?;
    let topo = system_host_topology(lab, &graph);
    let (mut running, rx) = start_logging(lab, &topo, &[]);
    let first = wait_lines(
        &rx,
        &[format!(
            "pkg[{TEST_PKG}]: installed {TEST_PKG} (not installed)"
        )],
        Duration::from_secs(120),
    )?;
    check!(
        first.iter().any(|l| l.contains("apt-get update")),
        "the first install did not say it updated apt's lists:\n{}",
        first.join("\n")
    );
    let version = installed_version(lab);
    check!(
        version == "2.0",
        "installed {version:?}, not the newest (2.0)"
    );
    let removed = Instant::now();
    lab.sh(SYSTEM_HOST, &format!("dpkg --remove {TEST_PKG} >/dev/null"));
    let again = wait_lines(
        &rx,
        &[format!(
            "pkg[{TEST_PKG}]: installed {TEST_PKG} (not installed)"
        )],
        Duration::from_secs(60),
    )?;
    let took = removed.elapsed();
    check!(
        installed_version(lab) == "2.0",
        "not installed again after its removal by hand:\n{}",
        again.join("\n")
    );
    check!(
        !again.iter().any(|l| l.contains("apt-get update")),
        "apt's lists were updated again although they had the package:\n{}",
        again.join("\n")
    );
    // A live edit pins the lower version: a downgrade, allowed. Then another removes it.
    std::fs::write(
        &graph,
        format!(
            "graph: pkg\nresources:\n  pkg:\n  - name: {TEST_PKG}\n    state: \"1.0\"\n    \
             allowdowngrade: true\n"
        ),
    )
    .map_err(fail)?;
    wait_lines(
        &rx,
        &[format!(
            "pkg[{TEST_PKG}]: installed {TEST_PKG}=1.0 (2.0 installed)"
        )],
        Duration::from_secs(60),
    )?;
    check!(
        installed_version(lab) == "1.0",
        "{TEST_PKG} {:?} installed, not the pinned 1.0",
        installed_version(lab)
    );
    std::fs::write(
        &graph,
        format!("graph: pkg\nresources:\n  pkg:\n  - name: {TEST_PKG}\n    state: uninstalled\n"),
    )
    .map_err(fail)?;
    wait_lines(
        &rx,
        &[format!(
            "pkg[{TEST_PKG}]: removed {TEST_PKG} (1.0 installed)"
        )],
        Duration::from_secs(60),
    )?;
    check!(
        installed_version(lab).is_empty(),
        "{TEST_PKG} {:?} still installed",
        installed_version(lab)
    );
    let (code, _) = running.interrupt()?;
    check!(code == Some(130), "exit {code:?} after ^C");
    eprintln!("reinstalled {took:?} after the removal by hand");
    check_no_leftovers(lab, &["r2", SYSTEM_HOST])
}

/// l2-3 keeps the machine's apt sources, whose mirrors the lab cannot reach (as a host
/// without a mirror). A pkg with `source:` (a .deb beside the graph on the initiator, sent
/// down through r2 as an artifact) and `state: "1.0"` installs it without apt reading any
/// source (under `--noop` first: it says so and installs nothing). A second run asks for the package `installed` with no source: it is there, so the
/// run converges without a change and without asking apt anything (no update, which would
/// wait on the unreachable mirrors).
fn a_source_deb_is_installed_at_depth_2_with_no_reachable_mirror_and_a_present_package_asks_apt_nothing(
    lab: &Lab,
) -> TestResult {
    clean(lab, true);
    let _undo = undo_packages(lab);
    let dir = tempfile::tempdir().map_err(fail)?;
    build_debs(dir.path(), &["1.0"], false)?;
    let graph = dir.path().join("deb.yaml");
    std::fs::write(
        &graph,
        format!(
            "graph: deb\nresources:\n  pkg:\n  - name: {TEST_PKG}\n    state: \"1.0\"\n    \
             source: {TEST_PKG}_1.0_all.deb\n"
        ),
    )
    .map_err(fail)?;
    let topo = system_host_topology(lab, &graph);
    let run = |topo: &Topo, extra: &[&str]| -> Result<String, libtest_mimic::Failed> {
        let mut args = vec![
            "--topology",
            topo.path.to_str().unwrap_or_default(),
            "--tmp-prefix",
            "--converged-timeout",
            "2",
        ];
        args.extend_from_slice(extra);
        let mut cmd = arbor_command(lab, &lab.home(), &args);
        cmd.env("ARBOR_LOG", "arbor=debug");
        let out = output_within(cmd, Duration::from_secs(120))?;
        exited(&out, 0)
    };
    // --noop: says what it would do, installs nothing.
    let log = run(&topo, &["--noop"])?;
    check!(
        log.contains(&format!(
            "pkg[{TEST_PKG}]: noop: would install {TEST_PKG} 1.0 from its source .deb (not \
             installed)"
        )),
        "--noop did not say it would install the source .deb:\n{log}"
    );
    check!(
        installed_version(lab).is_empty(),
        "--noop installed {TEST_PKG}"
    );
    let log = run(&topo, &[])?;
    check!(
        log.contains(&format!(
            "pkg[{TEST_PKG}]: installed {TEST_PKG} 1.0 from its source .deb (not installed)"
        )),
        "no install from the source .deb:\n{log}"
    );
    check!(
        !log.contains("apt-get update"),
        "apt's lists were updated for a source .deb:\n{log}"
    );
    check!(
        installed_version(lab) == "1.0",
        "{TEST_PKG} {:?} installed",
        installed_version(lab)
    );
    std::fs::write(
        &graph,
        format!("graph: deb\nresources:\n  pkg:\n  - name: {TEST_PKG}\n"),
    )
    .map_err(fail)?;
    let started = Instant::now();
    let log = run(&topo, &[])?;
    let took = started.elapsed();
    check!(
        !log.contains(&format!("pkg[{TEST_PKG}]: installed")) && !log.contains("apt-get update"),
        "an installed package was installed again, or apt asked:\n{log}"
    );
    check!(
        took < Duration::from_secs(30),
        "a run with nothing to do took {took:?}"
    );
    check!(
        installed_version(lab) == "1.0",
        "{TEST_PKG} {:?} installed after the second run",
        installed_version(lab)
    );
    check_no_leftovers(lab, &["r2", SYSTEM_HOST])
}

const TEST_UNIT: &str = "arbor-lab-sleep";

/// l2-3 runs systemd. A graph ships a unit file with a file resource and, after it, a svc
/// `running` and `enabled`: the service runs and is enabled at boot. Stopped by hand
/// (`systemctl stop`), it runs again within a second: the svc's watch hears systemd's own
/// signal; so it is after systemd re-executed itself. A live edit of the unit file refreshes the svc through the file's notify edge:
/// systemd is reloaded (the unit changed on disk) and the service restarted with the new unit.
/// A second run with `stopped` and `disabled` stops and disables it.
fn a_service_shipped_as_a_file_runs_enabled_at_depth_2_and_is_restarted_within_a_second_when_stopped_by_hand(
    lab: &Lab,
) -> TestResult {
    clean(lab, false);
    let unit_path = format!("/etc/systemd/system/{TEST_UNIT}.service");
    let _undo = Undo {
        lab,
        host: SYSTEM_HOST,
        shell: format!(
            "systemctl disable --now {TEST_UNIT} >/dev/null 2>&1; rm -f {unit_path}; \
             systemctl daemon-reload"
        ),
    };
    let dir = tempfile::tempdir().map_err(fail)?;
    let graph = dir.path().join("svc.yaml");
    let write_graph_described = |state: &str, startup: &str, description: &str| {
        std::fs::write(
            &graph,
            format!(
                "graph: svc\nresources:\n  file:\n  - name: {unit_path}\n    content: |\n      \
                 [Unit]\n      Description={description}\n      [Service]\n      \
                 ExecStart=/bin/sleep infinity\n      [Install]\n      \
                 WantedBy=multi-user.target\n  svc:\n  - name: {TEST_UNIT}\n    state: \
                 {state}\n    startup: {startup}\nedges:\n- name: unit\n  from: {{kind: file, \
                 name: {unit_path}}}\n  to: {{kind: svc, name: {TEST_UNIT}}}\n  notify: true\n"
            ),
        )
    };
    let write_graph =
        |state: &str, startup: &str| write_graph_described(state, startup, "arbor lab test");
    write_graph("running", "enabled").map_err(fail)?;
    let topo = system_host_topology(lab, &graph);
    let state = || {
        lab.sh(
            SYSTEM_HOST,
            &format!(
                "echo $(systemctl is-active {TEST_UNIT}) $(systemctl is-enabled {TEST_UNIT} \
                 2>/dev/null)"
            ),
        )
        .trim()
        .to_string()
    };
    let (mut running, rx) = start_logging(lab, &topo, &["-v"]);
    let first = wait_lines(
        &rx,
        &[format!("svc[{TEST_UNIT}]: enabled {TEST_UNIT}.service")],
        Duration::from_secs(90),
    )?;
    wait_until(
        "the service never ran enabled",
        Duration::from_secs(10),
        || state() == "active enabled",
    )?;
    // Stopped by hand: timed on the host itself, from the stop's return to active again.
    let stop_by_hand = || -> Result<u64, libtest_mimic::Failed> {
        let ms = lab.sh(
            SYSTEM_HOST,
            &format!(
                "systemctl stop {TEST_UNIT}; t0=$(date +%s%N); while ! systemctl is-active -q \
                 {TEST_UNIT}; do [ $(( $(date +%s%N) - t0 )) -gt 5000000000 ] && break; sleep \
                 0.02; done; echo $(( ($(date +%s%N) - t0) / 1000000 ))"
            ),
        );
        let ms: u64 = ms.trim().parse().map_err(fail)?;
        check!(
            ms <= 1000,
            "the service stopped by hand ran again only after {ms} ms ({}); the run said:\n{}\n{}",
            state(),
            first.join("\n"),
            rx.try_iter().collect::<Vec<_>>().join("\n")
        );
        Ok(ms)
    };
    let ms = stop_by_hand()?;
    // systemd re-executes itself (as after an upgrade): the watch connects again, and a stop
    // by hand is still reverted within a second.
    lab.sh(SYSTEM_HOST, "systemctl daemon-reexec");
    std::thread::sleep(Duration::from_secs(3));
    let ms_reexec = stop_by_hand()?;
    // A live edit of the unit file: the file changes, its notify edge refreshes the svc, which
    // reloads systemd (the unit changed on disk) and restarts the service (it cannot reload).
    let pid = || {
        lab.sh(
            SYSTEM_HOST,
            &format!("systemctl show -p MainPID --value {TEST_UNIT}"),
        )
        .trim()
        .to_string()
    };
    let before = pid();
    write_graph_described("running", "enabled", "edited").map_err(fail)?;
    wait_lines(
        &rx,
        &[format!(
            "svc[{TEST_UNIT}]: reloaded or restarted {TEST_UNIT}.service (refreshed)"
        )],
        Duration::from_secs(30),
    )?;
    let (after, description) = (
        pid(),
        lab.sh(
            SYSTEM_HOST,
            &format!("systemctl show -p Description --value {TEST_UNIT}"),
        ),
    );
    check!(
        after != before && after != "0" && description.trim() == "edited",
        "after the refresh: pid {before} -> {after}, description {description:?}"
    );
    let (code, _) = running.interrupt()?;
    check!(code == Some(130), "exit {code:?} after ^C");
    write_graph("stopped", "disabled").map_err(fail)?;
    let out = output_within(
        arbor_command(
            lab,
            &lab.home(),
            &[
                "--topology",
                topo.path.to_str().unwrap_or_default(),
                "--tmp-prefix",
                "--converged-timeout",
                "2",
            ],
        ),
        Duration::from_secs(90),
    )?;
    let log = exited(&out, 0)?;
    let now = state();
    check!(
        now == "inactive disabled",
        "after the stopped/disabled run the service is {now}:\n{log}"
    );
    eprintln!("restarted {ms} ms after a stop by hand, {ms_reexec} ms after a daemon-reexec");
    check_no_leftovers(lab, &["r2", SYSTEM_HOST])
}

/// `conf/` beside a graph copying it to two directories on the leaves, one with `purge`:
/// `a.txt` (0640), `sub/` (0750) with `b.txt` (0600) and `deeper/c.sh` (0755), `empty/`.
fn tree_graph(dir: &Path) -> Result<PathBuf, libtest_mimic::Failed> {
    use std::os::unix::fs::PermissionsExt;
    let conf = dir.join("conf");
    std::fs::create_dir_all(conf.join("sub/deeper")).map_err(fail)?;
    std::fs::create_dir_all(conf.join("empty")).map_err(fail)?;
    for (path, content, mode) in [
        ("a.txt", "alpha\n", 0o640),
        ("sub/b.txt", "beta\n", 0o600),
        ("sub/deeper/c.sh", "#!/bin/sh\necho gamma\n", 0o755),
    ] {
        let p = conf.join(path);
        std::fs::write(&p, content).map_err(fail)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).map_err(fail)?;
    }
    for (path, mode) in [("sub", 0o750), ("sub/deeper", 0o755), ("empty", 0o755)] {
        std::fs::set_permissions(conf.join(path), std::fs::Permissions::from_mode(mode))
            .map_err(fail)?;
    }
    let graph = dir.join("tree.yaml");
    std::fs::write(
        &graph,
        "graph: tree\nresources:\n  file:\n  - name: /tmp/from-tree-kept/\n    source: conf/\n    \
         recurse: true\n  - name: /tmp/from-tree-purged/\n    source: conf/\n    \
         recurse: true\n    purge: true\n    mode: \"0750\"\n",
    )
    .map_err(fail)?;
    Ok(graph)
}

/// A tree on a host: each entry's relative path, mode and type, then each file's content.
fn tree_on(lab: &Lab, host: &str, root: &str) -> String {
    lab.sh(
        host,
        &format!(
            "cd {root} 2>/dev/null && find . -mindepth 1 -printf '%P %m %y\\n' | sort && \
             find . -type f | sort | xargs -r cat; true"
        ),
    )
}

const TREE_WANT: &str = "\
a.txt 640 f
empty 755 d
sub 750 d
sub/b.txt 600 f
sub/deeper 755 d
sub/deeper/c.sh 755 f
alpha
beta
#!/bin/sh
echo gamma
";

fn a_source_directory_reaches_a_depth_2_leaf_drift_is_repaired_and_purge_removes_extras(
    lab: &Lab,
) -> TestResult {
    clean(lab, false);
    let dir = tempfile::tempdir().map_err(fail)?;
    let graph = tree_graph(dir.path())?;
    // Extras already there: kept without purge, removed with it.
    lab.sh(
        "l1-1",
        "mkdir -p /tmp/from-tree-kept /tmp/from-tree-purged/sub/stray-dir && \
         echo x > /tmp/from-tree-kept/stray && echo x > /tmp/from-tree-purged/stray && \
         echo x > /tmp/from-tree-purged/sub/stray-dir/f",
    );
    let topo = topology(&format!(
        "defaults:\n  user: root\nhosts:\n- host: 10.199.0.11\n  name: r1\n  children:\n  - host: 10.199.1.11\n    name: l1-1\n    graph: {}\n",
        graph.display()
    ));
    let (mut running, rx) = start_logging(lab, &topo, &[]);
    wait_lines(
        &rx,
        &["r1/l1-1: converged".to_string()],
        Duration::from_secs(60),
    )?;
    let purged = tree_on(lab, "l1-1", "/tmp/from-tree-purged");
    check!(purged == TREE_WANT, "the purged copy on l1-1:\n{purged}");
    let kept = tree_on(lab, "l1-1", "/tmp/from-tree-kept");
    let want_kept = TREE_WANT.replacen("sub 750 d\n", "stray 644 f\nsub 750 d\n", 1);
    let want_kept = want_kept.replacen("alpha\n", "alpha\nx\n", 1);
    check!(kept == want_kept, "the copy without purge on l1-1:\n{kept}");
    let top = lab.sh("l1-1", "stat -c %a /tmp/from-tree-purged");
    check!(top.trim() == "750", "the purged directory's mode: {top}");
    let relay_file = lab.sh("r1", "ls /tmp/from-tree-kept 2>&1 || true");
    check!(
        relay_file.contains("No such file"),
        "r1 runs no graph but has {relay_file}"
    );
    // Drift by hand: a deleted file deep in one tree, an edited one and a new stray in the
    // other; repaired, the stray purged.
    lab.sh(
        "l1-1",
        "rm /tmp/from-tree-purged/sub/deeper/c.sh && echo vandal > /tmp/from-tree-kept/a.txt \
         && echo y > /tmp/from-tree-purged/sub/new-stray",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let purged = tree_on(lab, "l1-1", "/tmp/from-tree-purged");
        let kept = tree_on(lab, "l1-1", "/tmp/from-tree-kept");
        if purged == TREE_WANT && kept == want_kept {
            break;
        }
        check!(
            Instant::now() < deadline,
            "not repaired within 10 s:\n{purged}\n--\n{kept}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = stop_with(&mut running, libc::SIGINT)?;
    check!(status.code() == Some(130), "exit {:?}", status.code());
    lab.sh("l1-1", "rm -rf /tmp/from-tree-*");
    check_no_leftovers(lab, &HOSTS)
}

/// An exported file may carry a `source`: each leaf publishes the source's bytes (from its
/// own artifact) as the export's content, and every leaf, under either relay, collects all
/// six.
fn an_exported_files_source_is_published_by_its_host_and_collected_across_relays(
    lab: &Lab,
) -> TestResult {
    clean(lab, false);
    let dir = tempfile::tempdir().map_err(fail)?;
    let banner = "# published from a source on the initiator\nmotd: ünïcödé, \"quoted\"\n";
    std::fs::write(dir.path().join("banner.txt"), banner).map_err(fail)?;
    let graph = dir.path().join("published.yaml");
    std::fs::write(
        &graph,
        "graph: published\nresources:\n  file:\n  - name: \"@@pub-{{hostname}}\"\n    \
         path: \"/tmp/from-pub-{{hostname}}\"\n    source: banner.txt\ncollect:\n- kind: file\n  \
         pattern: \"/tmp/\"\n",
    )
    .map_err(fail)?;
    let topo = topology(&TWO_RELAYS.replace("{leaf}", &graph.to_string_lossy()));
    let out = run(lab, &topo, &["--converged-timeout", "1"]);
    let log = exited(&out, 0)?;
    for leaf in LEAVES {
        for from in LEAVES {
            let got = lab.sh(leaf, &format!("cat /tmp/from-pub-{from} 2>&1"));
            check!(
                got == banner,
                "{leaf}: /tmp/from-pub-{from} holds {got:?}, want {banner:?}\n{log}"
            );
        }
    }
    check_no_leftovers(lab, &HOSTS)
}

fn a_tree_of_identical_files_crosses_the_initiators_link_about_once(lab: &Lab) -> TestResult {
    clean(lab, false);
    let one_relay = "defaults:\n  user: root\nhosts:\n- host: 10.199.0.11\n  name: r1\n  \
                     children:\n  - host: 10.199.1.1[1-3]\n    name: l1-[1-3]\n    graph: {leaf}\n";
    // First a run without a source, so the binary is in every cache and the measured run's
    // link carries the tree and the run's own traffic.
    let out = run(lab, &topology(one_relay), &["--converged-timeout", "2"]);
    exited(&out, 0)?;
    let dir = tempfile::tempdir().map_err(fail)?;
    let conf = dir.path().join("conf");
    let mut data = vec![0u8; 3 << 20];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut data))
        .map_err(fail)?;
    for i in 0..8 {
        let sub = conf.join(format!("d{}", i % 3));
        std::fs::create_dir_all(&sub).map_err(fail)?;
        std::fs::write(sub.join(format!("copy{i}.bin")), &data).map_err(fail)?;
    }
    let graph = dir.path().join("tree.yaml");
    std::fs::write(
        &graph,
        "graph: tree\nresources:\n  file:\n  - name: /tmp/from-tree/\n    source: conf/\n    \
         recurse: true\n",
    )
    .map_err(fail)?;
    let topo = topology(&one_relay.replace("{leaf}", &graph.to_string_lossy()));
    let (tx0, rx0) = lab.init_link_bytes();
    let out = run(lab, &topo, &["--converged-timeout", "2"]);
    let (tx1, rx1) = lab.init_link_bytes();
    let log = exited(&out, 0)?;
    let size = data.len() as u64;
    let want = sha256_of(&conf.join("d0/copy0.bin"))?;
    for leaf in ["l1-1", "l1-2", "l1-3"] {
        let got = lab.sh(
            leaf,
            "cd /tmp/from-tree && find . -type f | sort | xargs sha256sum | cut -d' ' -f1 | uniq -c",
        );
        check!(
            got.trim() == format!("8 {want}"),
            "{leaf}'s tree: {got}\n{log}"
        );
    }
    let sent = tx1 - tx0;
    eprintln!(
        "a tree of 8 identical {size}-byte files, 1 relay x 3 leaves: the initiator's link \
         carried {sent} bytes out, {} in",
        rx1 - rx0
    );
    check!(
        sent >= size && sent < size + size / 2,
        "the initiator's link carried {sent} bytes out for a tree of 8 copies of a {size}-byte \
         file; want about one copy\n{log}"
    );
    for h in ["l1-1", "l1-2", "l1-3"] {
        lab.sh(h, "rm -rf /tmp/from-tree");
    }
    check_no_leftovers(lab, &HOSTS)
}

/// A thin link, for as long as the value lives: the initiator's side shaped to 20 Mbit/s.
fn thin_link(lab: &Lab) -> Undo<'_> {
    let dev = lab.get("LAB_INIT_IF").to_string();
    lab.sh(
        "init",
        &format!("tc qdisc replace dev {dev} root tbf rate 20mbit burst 25kb latency 500ms"),
    );
    Undo {
        lab,
        host: "init",
        shell: format!("tc qdisc del dev {dev} root"),
    }
}

/// A relay starts before the artifacts only its leaves need have crossed its link
/// (`Start::arriving`), and passes them on while they still arrive (cut-through): on a
/// 20 Mbit/s link, with binaries cached, each relay's leaves are connected, checked and
/// running (their engines waiting for the artifact), and one of them already has part of the 32 MiB
/// artifact, before the last byte of it reached the relay (about 27 s for 2 copies at
/// 20 Mbit/s; staging a leaf took up to 5.5 s under the full suite's load, longer than an
/// 8 MiB crossing). Then again with `seed_siblings`: the relay the initiator does not copy to
/// fetches the artifact from its sibling while that one still receives it, and passes it on
/// as it comes, so its leaves, too, have part of it before the first relay holds the whole.
/// The events' own order (`--output json`) says so.
fn a_relay_stages_its_leaves_and_passes_their_artifact_on_while_it_still_crosses_the_thin_link(
    lab: &Lab,
) -> TestResult {
    clean(lab, true);
    let art = artifact_graph(32)?;
    // Binaries first: what the timed run carries is the artifact.
    let out = run(lab, &topology(TWO_RELAYS), &["--converged-timeout", "1"]);
    exited(&out, 0)?;
    for seeded in [false, true] {
        for h in HOSTS {
            lab.sh(h, "rm -rf /root/.cache/arbor/artifacts /tmp/from-*");
        }
        let body = TWO_RELAYS.replace("{leaf}", &art.graph.to_string_lossy());
        let topo = topology(&if seeded {
            format!("seed_siblings: true\n{body}")
        } else {
            body
        });
        let _shaped = thin_link(lab);
        let out = run(
            lab,
            &topo,
            &["--output", "json", "--converged-timeout", "1"],
        );
        let log = exited(&out, 0)?;
        check_artifact_on(lab, &LEAVES, &art, &log)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let events: Vec<serde_json::Value> = stdout
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let what = format!("artifact {}", &art.sha256[..12]);
        let at = |pred: &dyn Fn(&serde_json::Value) -> bool| events.iter().position(pred);
        let arrival = |relay: &str| {
            at(&|e| {
                e["type"] == "transfer"
                    && e["host"] == relay
                    && e["what"] == what.as_str()
                    && (e["sent"] == e["total"] || e["cached"] == true)
            })
        };
        let under = |relay: &str, e: &serde_json::Value| {
            e["host"]
                .as_str()
                .is_some_and(|h| h.starts_with(&format!("{relay}/")))
        };
        if seeded {
            check!(
                log.contains("1 artifact(s) fetched from a sibling (seeded)"),
                "seeded run: no relay says it fetched the artifact from its sibling\n{log}"
            );
        }
        for relay in ["r1", "r2"] {
            let sibling = if relay == "r1" { "r2" } else { "r1" };
            // A relay that fetched it from its sibling has no copy from the initiator: the
            // sibling's is the one it came after.
            let arrived = match arrival(relay) {
                None if seeded => arrival(sibling),
                a => a,
            };
            // Its leaves are staged and running (their engines waiting for the artifact)
            // before the artifact has crossed.
            let leaf_waiting =
                at(&|e| e["type"] == "state" && under(relay, e) && e["state"] == "running");
            let (Some(arrived), Some(leaf_waiting)) = (arrived, leaf_waiting) else {
                return Err(fail(format!(
                    "{relay} (seeding: {seeded}): no final transfer of {what} ({arrived:?}) \
                     or no leaf running ({leaf_waiting:?})\n{stdout}\n{log}"
                )));
            };
            check!(
                leaf_waiting < arrived,
                "{relay} (seeding: {seeded}): its first leaf was running at event \
                 {leaf_waiting} ({}), after the artifact reached it at event {arrived} \
                 ({})\n{log}",
                events[leaf_waiting],
                events[arrived]
            );
            // Cut-through: a leaf has part of it before the relay (or, seeded, the relay it
            // fetches from) holds the whole.
            let leaf_partly = at(&|e| {
                e["type"] == "transfer"
                    && under(relay, e)
                    && e["what"] == what.as_str()
                    && e["sent"].as_u64().is_some_and(|s| s > 0)
                    && e["sent"].as_u64() < e["total"].as_u64()
            });
            check!(
                leaf_partly.is_some_and(|p| p < arrived),
                "{relay} (seeding: {seeded}): no leaf had part of {what} before event \
                 {arrived} ({}); first partial transfer to a leaf: {:?}\n{log}",
                events[arrived],
                leaf_partly.map(|p| &events[p])
            );
        }
    }
    check_no_leftovers(lab, &HOSTS)
}

/// A relay whose disk fills while an artifact only its leaves need arrives: r1's artifacts
/// dir is a 4 MiB tmpfs (in r1's own mount namespace), the artifact 8 MiB. The copy fails on
/// r1 (every way the initiator tries it: over QUIC, `arbor receive` over SSH, SFTP); r1's
/// leaves, which may have begun following the copy as it arrived (cut-through), fail naming
/// r1 and the artifact; r2's leaves converge; the run exits 1; nothing half-written stays in
/// r1's cache and nothing runs anywhere afterwards.
fn a_relay_whose_disk_fills_while_an_artifact_arrives_fails_its_leaves_and_keeps_nothing(
    lab: &Lab,
) -> TestResult {
    clean(lab, true);
    let art = artifact_graph(8)?;
    // Binaries first: the run measured carries the artifact.
    let out = run(lab, &topology(TWO_RELAYS), &["--converged-timeout", "1"]);
    exited(&out, 0)?;
    let dir = "/root/.cache/arbor/artifacts";
    lab.sh("r1", &format!("rm -rf {dir} && mkdir -p -m 700 {dir} && mount -t tmpfs -o size=4m,mode=0700 arbor-full {dir}"));
    let _full = Undo {
        lab,
        host: "r1",
        shell: format!("umount {dir}"),
    };
    let topo = topology(&TWO_RELAYS.replace("{leaf}", &art.graph.to_string_lossy()));
    let out = run(lab, &topo, &["--converged-timeout", "1"]);
    let log = exited(&out, 1)?;
    for leaf in ["l1-1", "l1-2", "l1-3"] {
        check!(
            log.lines().any(|l| l.contains(leaf)
                && l.contains("failed")
                && l.contains("did not reach this node")),
            "no failure of r1/{leaf} saying its artifact did not reach r1\n{log}"
        );
    }
    // The cause, though SFTP (the last way tried) says only "Failure".
    check!(
        log.lines().any(|l| l.contains("r1/l1-1")
            && l.contains(&format!("artifact {}", art.sha256))
            && l.contains("No space left on device")),
        "r1/l1-1's failure does not name the artifact and the full disk\n{log}"
    );
    check_artifact_on(lab, &["l2-1", "l2-2", "l2-3"], &art, &log)?;
    let left = lab.sh("r1", &format!("ls -A {dir} | grep -v '^.src$' || true"));
    check!(
        left.trim().is_empty(),
        "r1's full cache keeps {left:?} after the failed copy\n{log}"
    );
    for leaf in ["l1-1", "l1-2", "l1-3"] {
        let there = lab.sh(
            leaf,
            &format!("ls -A {dir} 2>/dev/null | grep -v '^.src$' || true"),
        );
        check!(
            there.trim().is_empty(),
            "{leaf} keeps {there:?} though its relay never had the artifact whole\n{log}"
        );
    }
    check_no_leftovers(lab, &HOSTS)
}

/// With the default (`--compress auto`), an 8 MiB compressible artifact crosses a 20 Mbit/s
/// link zstd-compressed, unpacked by the relays' arbor; `--compress never` copies it plain.
/// The unshaped link is measured and reported, not asserted: with debug builds on a loaded
/// lab machine the SSH link itself runs at 4 to 90 MB/s (its crypto is CPU-bound), so auto
/// may rightly compress there (the release-build figures are in docs/benchmarks.md).
fn artifacts_go_zstd_compressed_on_a_thin_link_and_plain_with_never(lab: &Lab) -> TestResult {
    clean(lab, true);
    // Text: log-like lines, as a config tree or a package's contents compress.
    let mut data = Vec::new();
    let mut i = 0u64;
    while data.len() < 8 << 20 {
        data.extend_from_slice(
            format!(
                "{i:08} host{} GET /api/v1/items/{} 200 {} ms\n",
                i % 97,
                i.wrapping_mul(7919) % 100_003,
                i % 313
            )
            .as_bytes(),
        );
        i += 1;
    }
    let art = artifact_graph_of(data)?;
    // The binary first, so that the runs measured carry artifacts and the run's own traffic.
    let out = run(lab, &topology(TWO_RELAYS), &["--converged-timeout", "1"]);
    exited(&out, 0)?;
    let topo = topology(&TWO_RELAYS.replace("{leaf}", &art.graph.to_string_lossy()));
    let drop_artifacts = || {
        for h in HOSTS {
            lab.sh(h, "rm -rf /root/.cache/arbor/artifacts /tmp/from-*");
        }
    };
    let mut runs = Vec::new();
    for (label, thin, extra) in [
        ("unshaped, auto", false, &[][..]),
        ("unshaped, never", false, &["--compress", "never"][..]),
        ("20 Mbit/s, auto", true, &[][..]),
        ("20 Mbit/s, never", true, &["--compress", "never"][..]),
    ] {
        drop_artifacts();
        let _shaped = thin.then(|| thin_link(lab));
        let (tx0, _) = lab.init_link_bytes();
        let started = Instant::now();
        let out = run(
            lab,
            &topo,
            &["--converged-timeout", "1"]
                .iter()
                .chain(extra)
                .copied()
                .collect::<Vec<_>>(),
        );
        let took = started.elapsed().as_secs_f64();
        let (tx1, _) = lab.init_link_bytes();
        let log = exited(&out, 0)?;
        check_artifact_on(lab, &LEAVES, &art, &log)?;
        eprintln!(
            "{label}: {} bytes out for 2 copies of the {}-byte artifact, {took:.1} s",
            tx1 - tx0,
            art.size
        );
        runs.push((tx1 - tx0, log));
    }
    let two = 2 * art.size;
    check!(
        runs[1].0 >= two,
        "with --compress never, {} bytes went out for two copies of {}\n{}",
        runs[1].0,
        art.size,
        runs[1].1
    );
    check!(
        runs[2].0 < two / 3,
        "on a 20 Mbit/s link {} bytes went out for two copies of {} bytes: want them \
         zstd-compressed (under 1/3)\n{}",
        runs[2].0,
        art.size,
        runs[2].1
    );
    check!(
        runs[3].0 >= two,
        "with --compress never, {} bytes went out for two copies of {}\n{}",
        runs[3].0,
        art.size,
        runs[3].1
    );
    check_no_leftovers(lab, &HOSTS)
}

/// A 40 MiB artifact, then the same with 1% of it changed (100 blocks of 4 KiB): the second
/// run sends each relay a zstd patch against the version in its cache, and each relay its
/// leaves one against theirs; the initiator's link carries at most 5% of the artifact.
/// Then another 1%, with r2's copy of the version before damaged in place: its patch gives
/// the wrong sha256, is refused, and r2 gets the whole file; every leaf ends up right.
fn a_one_percent_change_to_a_40_mib_artifact_crosses_the_link_as_a_patch(lab: &Lab) -> TestResult {
    clean(lab, true);
    let mut art = artifact_graph(40)?;
    let topo = topology(&TWO_RELAYS.replace("{leaf}", &art.graph.to_string_lossy()));
    let out = run(lab, &topo, &["--converged-timeout", "1"]);
    let log = exited(&out, 0)?;
    check_artifact_on(lab, &LEAVES, &art, &log)?;
    // 1% (100 blocks of 4 KiB, spread over the file, rewritten with new random bytes), rolled
    // out and checked on every leaf: the bytes out on the initiator's link, and the log.
    let roll_a_change = |art: &mut ArtifactGraph| -> Result<(u64, String), libtest_mimic::Failed> {
        let mut data = std::fs::read(art.data()).map_err(fail)?;
        let blocks = random_bytes(100 * 4096)?;
        let stride = data.len() / 100;
        for (k, block) in blocks.chunks(4096).enumerate() {
            let at = k * stride + (k * 7919) % (stride - 4096);
            data[at..at + 4096].copy_from_slice(block);
        }
        std::fs::write(art.data(), &data).map_err(fail)?;
        art.sha256 = sha256_of(&art.data())?;
        let (tx0, _) = lab.init_link_bytes();
        let out = run(lab, &topo, &["--converged-timeout", "1"]);
        let (tx1, _) = lab.init_link_bytes();
        let log = exited(&out, 0)?;
        check_artifact_on(lab, &LEAVES, art, &log)?;
        Ok((tx1 - tx0, log))
    };
    let (sent, log) = roll_a_change(&mut art)?;
    eprintln!(
        "1% of a {}-byte artifact changed: {sent} bytes out on the initiator's link ({:.2}% \
         of the artifact)",
        art.size,
        sent as f64 * 100.0 / art.size as f64
    );
    for relay in ["r1", "r2"] {
        let line = format!("{relay}: 1 artifact(s) sent as patches");
        check!(log.contains(&line), "no line {line:?}\n{log}");
    }
    check!(
        sent <= art.size / 20,
        "the initiator's link carried {sent} bytes for a 1% change of a {}-byte artifact; \
         want at most 5%\n{log}",
        art.size
    );
    check_no_leftovers(lab, &HOSTS)?;

    // The base damaged on r2, same size: its patch is refused, the whole file follows.
    let base = format!("/root/.cache/arbor/artifacts/{}", art.sha256);
    lab.sh(
        "r2",
        &format!("printf damaged | dd of={base} bs=1 seek=4096 conv=notrunc 2>/dev/null"),
    );
    let (sent, log) = roll_a_change(&mut art)?;
    eprintln!("with r2's base damaged: {sent} bytes out on the initiator's link");
    check!(
        log.contains("(patched against a base that differs from the sender's)"),
        "no refused patch reported\n{log}"
    );
    let cached = lab.sh(
        "r2",
        &format!(
            "sha256sum /root/.cache/arbor/artifacts/{} | cut -d' ' -f1",
            art.sha256
        ),
    );
    check!(
        cached.trim() == art.sha256,
        "r2 caches {cached:?} for {}\n{log}",
        art.sha256
    );
    check!(
        sent >= art.size && sent <= art.size + art.size / 10,
        "the initiator's link carried {sent} bytes: want the whole {}-byte artifact once \
         (for r2) and a patch (for r1)\n{log}",
        art.size
    );
    check_no_leftovers(lab, &HOSTS)
}

/// Rolling a second build over the first: the relays' and leaves' caches hold build A, and
/// the run of build B sends each host a zstd patch against it. Build B is build A with its
/// version string edited in place (`arbor version` says 0.1.9): not a rebuild, whose patch
/// would be larger, but the same mechanism.
fn a_second_build_rolls_out_over_the_first_as_a_patch(lab: &Lab) -> TestResult {
    clean(lab, true);
    let dir = tempfile::tempdir().map_err(fail)?;
    let a = dir.path().join("a/arbor");
    let b = dir.path().join("b/arbor");
    let bytes = std::fs::read(ARBOR).map_err(fail)?;
    let (old, new) = (b"arbor 0.1.0".as_slice(), b"arbor 0.1.9".as_slice());
    let at = bytes
        .windows(old.len())
        .position(|w| w == old)
        .ok_or_else(|| fail("no version string in the binary"))?;
    let mut edited = bytes.clone();
    edited[at..at + new.len()].copy_from_slice(new);
    use std::os::unix::fs::PermissionsExt;
    for (path, body) in [(&a, &bytes), (&b, &edited)] {
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new("/"))).map_err(fail)?;
        std::fs::write(path, body).map_err(fail)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(fail)?;
    }
    let version = Command::new(&b).arg("version").output().map_err(fail)?;
    check!(
        text(&version).contains("arbor 0.1.9"),
        "build B says {}",
        text(&version)
    );
    let topo = topology(TWO_RELAYS);
    let home = lab.home();
    let run_build = |binary: &Path| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", lab.init_ns()])
            .arg(binary)
            .args(["run", "--topology"])
            .arg(&topo.path)
            .args(["--tmp-prefix", "--converged-timeout", "1"])
            .env("HOME", &home)
            .env_remove("SSH_AUTH_SOCK")
            .env("ARBOR_LOG", "arbor=info");
        c.output()
    };
    let out = run_build(&a).map_err(fail)?;
    exited(&out, 0)?;
    let (tx0, _) = lab.init_link_bytes();
    let out = run_build(&b).map_err(fail)?;
    let (tx1, _) = lab.init_link_bytes();
    let log = exited(&out, 0)?;
    let sent = tx1 - tx0;
    let size = edited.len() as u64;
    eprintln!(
        "build B over build A ({size} bytes): {sent} bytes out on the initiator's link \
         ({:.2}% of the binary)",
        sent as f64 * 100.0 / size as f64
    );
    for relay in ["r1", "r2"] {
        let line = format!("{relay}: arbor upgraded by a patch");
        check!(log.contains(&line), "no line {line:?}\n{log}");
    }
    let want = sha256_of(&b)?;
    for host in HOSTS {
        let got = lab.sh(
            host,
            &format!("sha256sum /root/.cache/arbor/bin/{want}/arbor | cut -d' ' -f1"),
        );
        check!(got.trim() == want, "{host}: build B's cache entry: {got:?}");
    }
    check!(
        sent <= size / 4,
        "the initiator's link carried {sent} bytes to roll out build B over build A; want at \
         most 25% of the {size}-byte binary\n{log}"
    );
    check_no_leftovers(lab, &HOSTS)
}

/// With `seed_siblings: true`, a 40 MiB incompressible artifact for the 6 leaves of 2 relays
/// crosses the initiator's link once: the first relay to need it receives it, and the other
/// fetches it from that relay over the edge network. With the relays cut from each other (a
/// route in r2's namespace), each fetch fails at once or after the 2 s connect timeout, and
/// each relay gets its own copy from the initiator: twice the bytes, and the run converges.
/// The binary is counted apart (it is seeded too: see the next test): a first run stages it
/// (and is reported), and the runs measured find it in the relays' caches.
fn a_40_mib_artifact_crosses_the_link_once_with_sibling_seeding_and_twice_when_cut(
    lab: &Lab,
) -> TestResult {
    clean(lab, true);
    let art = artifact_graph(40)?;
    let rollout = rollout_graph(&art)?;
    let seeded = format!("seed_siblings: true\n{TWO_RELAYS}");
    let topo = topology(&seeded.replace("{leaf}", &rollout.graph.to_string_lossy()));
    // What crosses: the artifact and the tree's files.
    let size = art.size + rollout.bytes;
    let drop_artifacts = || {
        for h in HOSTS {
            lab.sh(h, "rm -rf /root/.cache/arbor/artifacts /tmp/from-*");
        }
    };
    let measured = |label: &str| -> Result<(u64, String), libtest_mimic::Failed> {
        let (tx0, _) = lab.init_link_bytes();
        let started = Instant::now();
        let out = run(lab, &topo, &["--converged-timeout", "1"]);
        let took = started.elapsed().as_secs_f64();
        let (tx1, _) = lab.init_link_bytes();
        let log = exited(&out, 0)?;
        check_artifact_on(lab, &LEAVES, &art, &log)?;
        check_rollout_on(lab, &rollout, &log)?;
        eprintln!(
            "{label}: {} bytes out on the initiator's link for the {size} bytes of the \
             artifact and the tree ({:.2} ×), {took:.1} s",
            tx1 - tx0,
            (tx1 - tx0) as f64 / size as f64
        );
        Ok((tx1 - tx0, log))
    };
    // Cold: the binary too (one copy of it, seeded; measured by the next test).
    measured("cold caches, seeding (binary included)")?;
    drop_artifacts();
    let (sent, log) = measured("binary cached, seeding")?;
    check!(
        log.contains("1 artifact(s) fetched from a sibling (seeded)"),
        "no relay says it fetched the artifact from its sibling\n{log}"
    );
    check!(
        sent <= size + size / 10,
        "with seeding the initiator's link carried {sent} bytes for {size} bytes of artifact \
         and tree and 2 relays: want at most 1.1 ×\n{log}"
    );
    drop_artifacts();
    let cut = Undo {
        lab,
        host: "r2",
        shell: "ip route del unreachable 10.199.0.11/32".into(),
    };
    lab.sh("r2", "ip route add unreachable 10.199.0.11/32");
    let started = Instant::now();
    let (sent, log) = measured("binary cached, seeding cut")?;
    drop(cut);
    check!(
        log.contains("from a sibling failed") && log.contains("copied it from this node instead"),
        "no relay reports the failed seeding\n{log}"
    );
    check!(
        sent <= 2 * size + size / 5 && sent >= 2 * size,
        "with seeding cut the initiator's link carried {sent} bytes for {size} bytes of \
         artifact and tree and 2 relays: want 2 × to 2.2 ×\n{log}"
    );
    check!(
        started.elapsed() < Duration::from_secs(60),
        "the run with seeding cut took {:?}",
        started.elapsed()
    );
    check_no_leftovers(lab, &HOSTS)
}

/// Seeding the binary's first copy: with cold caches and `seed_siblings`, one relay receives
/// arbor from the initiator and the other fetches it from that relay (bash's /dev/tcp, checked
/// by sha256sum: it has no arbor yet), so the binary crosses the initiator's link once. With
/// the relays cut from each other (a route in r2's namespace) the fetch fails, the relay that
/// tried gets its own copy within a few seconds, and the binary crosses twice. `--compress
/// never`, so that each copy of the binary is its size on the link; a 1 MiB artifact, so that
/// the binary's copies are what the counts tell apart.
fn the_binarys_first_copy_crosses_the_link_once_with_sibling_seeding_and_twice_when_cut(
    lab: &Lab,
) -> TestResult {
    let art = artifact_graph(1)?;
    let seeded = format!("seed_siblings: true\n{TWO_RELAYS}");
    let topo = topology(&seeded.replace("{leaf}", &art.graph.to_string_lossy()));
    let binary = std::fs::metadata(ARBOR).map_err(fail)?.len();
    let measured = |label: &str| -> Result<(u64, String), libtest_mimic::Failed> {
        clean(lab, true);
        let (tx0, _) = lab.init_link_bytes();
        let started = Instant::now();
        let out = run(
            lab,
            &topo,
            &["--converged-timeout", "1", "--compress", "never"],
        );
        let took = started.elapsed().as_secs_f64();
        let (tx1, _) = lab.init_link_bytes();
        let log = exited(&out, 0)?;
        check_artifact_on(lab, &LEAVES, &art, &log)?;
        eprintln!(
            "{label}: {} bytes out on the initiator's link for the {binary}-byte binary and \
             the {}-byte artifact ({:.2} × the binary), {took:.1} s",
            tx1 - tx0,
            art.size,
            (tx1 - tx0) as f64 / binary as f64
        );
        Ok((tx1 - tx0, log))
    };
    let (sent, log) = measured("cold caches, seeding")?;
    check!(
        log.contains("arbor fetched from its sibling"),
        "no relay says it fetched arbor from its sibling\n{log}"
    );
    check!(
        sent <= binary + binary / 10 + 2 * art.size,
        "with seeding the initiator's link carried {sent} bytes for a {binary}-byte binary \
         and 2 relays: want at most 1.1 × the binary plus the artifact\n{log}"
    );
    // Each relay's binary is arbor, intact.
    let sha = sha256_of(Path::new(ARBOR))?;
    for r in ["r1", "r2"] {
        let got = lab.sh(
            r,
            &format!("sha256sum /root/.cache/arbor/bin/{sha}/arbor | cut -d' ' -f1"),
        );
        check!(got.trim() == sha, "{r}: its cached arbor is {got:?}\n{log}");
    }
    let cut = Undo {
        lab,
        host: "r2",
        shell: "ip route del unreachable 10.199.0.11/32".into(),
    };
    lab.sh("r2", "ip route add unreachable 10.199.0.11/32");
    let (sent, log) = measured("cold caches, seeding cut")?;
    drop(cut);
    let fallback = log
        .lines()
        .find(|l| l.contains("seeding arbor from a sibling failed"))
        .unwrap_or_default();
    check!(
        fallback.contains("copying it from this node instead"),
        "no relay reports the failed seeding of arbor\n{log}"
    );
    let after: f64 = fallback
        .split("after ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or(f64::MAX);
    eprintln!("the fallback: {fallback}");
    let quick = after <= 3.0;
    check!(
        quick,
        "the failed fetch took {after} s before the fallback: want at most 3\n{fallback}"
    );
    check!(
        sent >= 2 * binary,
        "with seeding cut the initiator's link carried {sent} bytes for a {binary}-byte \
         binary and 2 relays: want 2 copies of it\n{log}"
    );
    check_no_leftovers(lab, &HOSTS)
}

/// The capability, from the inside: a seeder (`arbor seed-serve` on r1) serves its artifact
/// to r2 only under the capability it was given, for that artifact, once, and not after it
/// expires; a hostile seeder (this test binary on r1) that seals other bytes under the right
/// key gets them refused by r2's sha256 check, and nothing is left behind.
fn a_sibling_fetch_needs_its_capability_once_and_garbage_from_a_seeder_is_not_kept(
    lab: &Lab,
) -> TestResult {
    use arbor::node::sibling::Capability;
    clean(lab, true);
    let size = 3_000_000u64;
    lab.sh(
        "r1",
        &format!("head -c {size} /dev/urandom > /root/seed.bin"),
    );
    lab.sh("r2", "rm -rf /root/got && mkdir -p /root/got");
    let sha = lab
        .sh("r1", "sha256sum /root/seed.bin | cut -d' ' -f1")
        .trim()
        .to_string();
    let other = "0".repeat(64);
    // Starts a server on r1 (its command line, the capability on stdin), returns its address.
    let servers = std::sync::Mutex::new(Vec::<std::process::Child>::new());
    // (Its stdin stays open for `hold` seconds: its end revokes the capability.)
    let start =
        |program: &str, cap: &Capability, hold: u64| -> Result<String, libtest_mimic::Failed> {
            lab.sh("r1", "rm -f /tmp/serve.out /tmp/serve.err");
            // Spawned, not waited for: it runs in the background on r1.
            let shell = format!(
                "{{ printf '%s' '{}'; sleep {hold}; }} | {program} >/tmp/serve.out \
                 2>/tmp/serve.err",
                cap.line()
            );
            let child = Command::new(support::repo_root().join("integration/lab"))
                .args(["exec", "--name", &lab.name, "r1", "sh", "-c", &shell])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(fail)?;
            servers.lock().map_err(fail)?.push(child);
            let until = Instant::now() + Duration::from_secs(20);
            loop {
                let out = lab.sh("r1", "cat /tmp/serve.out 2>/dev/null || true");
                if let Some(addr) = out.lines().find_map(|l| l.strip_prefix("listening ")) {
                    return Ok(addr.trim().to_string());
                }
                if Instant::now() > until {
                    return Err(fail(format!(
                        "the seeder did not listen: {out} {}",
                        lab.sh("r1", "cat /tmp/serve.err 2>/dev/null || true")
                    )));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        };
    let serve = |expire: u64| {
        format!(
            "{ARBOR} seed-serve --file /root/seed.bin --sha256 {sha} --size {size} \
             --expire {expire} --bind 10.199.0.11:0"
        )
    };
    let fetch = |addr: &str, cap: &Capability, sha: &str, dest: &str| {
        lab.exec(
            "r2",
            &format!(
                "printf '%s' '{}' | {ARBOR} seed-fetch --from {addr} --dest /root/got/{dest} \
                 --sha256 {sha} --size {size}",
                cap.line()
            ),
        )
    };
    let nothing_kept = || lab.sh("r2", "ls -A /root/got");
    let cap = Capability::new();
    let addr = start(&serve(20), &cap, 20)?;
    // A guessed capability, then the right one for another artifact: refused.
    let out = fetch(&addr, &Capability::new(), &sha, "a");
    let t = text(&out);
    check!(out.status.code() == Some(1) && t.contains("refused"), "{t}");
    let out = fetch(&addr, &cap, &other, "a");
    let t = text(&out);
    check!(out.status.code() == Some(1) && t.contains("refused"), "{t}");
    check!(nothing_kept().is_empty(), "kept: {}", nothing_kept());
    // The right one: the artifact, checked.
    let out = fetch(&addr, &cap, &sha, "a");
    check!(out.status.success(), "{}", text(&out));
    let got = lab.sh("r2", "sha256sum /root/got/a | cut -d' ' -f1");
    check!(got.trim() == sha, "fetched {got}, want {sha}");
    // Used once: nothing serves it again.
    let out = fetch(&addr, &cap, &sha, "b");
    check!(!out.status.success(), "{}", text(&out));
    let said = lab.sh("r1", "cat /tmp/serve.err");
    check!(
        said.contains("refused a fetch from 10.199.0.12")
            && said.contains("a wrong capability")
            && said.contains("another artifact than its capability names")
            && said.contains(&format!("served {size} bytes")),
        "the seeder said: {said}"
    );
    lab.sh("r2", "rm -f /root/got/a");
    // Expired: refused.
    let cap = Capability::new();
    let addr = start(&serve(1), &cap, 5)?;
    std::thread::sleep(Duration::from_millis(2500));
    let out = fetch(&addr, &cap, &sha, "c");
    check!(!out.status.success(), "{}", text(&out));
    let said = lab.sh("r1", "cat /tmp/serve.err");
    check!(said.contains("expired"), "the seeder said: {said}");
    // Revoked: the parent's exec ended (its stdin closed) before any fetch.
    let cap = Capability::new();
    let addr = start(&serve(20), &cap, 0)?;
    std::thread::sleep(Duration::from_millis(500));
    let out = fetch(&addr, &cap, &sha, "c");
    check!(!out.status.success(), "{}", text(&out));
    let said = lab.sh("r1", "cat /tmp/serve.err");
    check!(said.contains("revoked"), "the seeder said: {said}");
    // A hostile seeder: other bytes, sealed under the right key.
    let cap = Capability::new();
    let me = std::env::current_exe().map_err(fail)?;
    let hostile = format!(
        "ARBOR_TREE_HOSTILE_SEEDER='10.199.0.11:0 {sha} {size}' {}",
        me.display()
    );
    let addr = start(&hostile, &cap, 0)?;
    let out = fetch(&addr, &cap, &sha, "d");
    let t = text(&out);
    check!(
        out.status.code() == Some(1) && t.contains("not kept"),
        "{t}"
    );
    check!(nothing_kept().is_empty(), "kept: {}", nothing_kept());
    lab.sh("r1", "rm -f /root/seed.bin");
    for mut c in servers.into_inner().map_err(fail)? {
        let _ = c.kill();
        let _ = c.wait();
    }
    check_no_leftovers(lab, &HOSTS)
}

/// A seeder that knows the capability and seals `size` bytes that are not the artifact.
fn hostile_seeder(spec: &str) -> std::process::ExitCode {
    use std::io::{BufRead, Read, Write};
    let words: Vec<&str> = spec.split_whitespace().collect();
    let [bind, sha, size] = words[..] else {
        return std::process::ExitCode::from(2);
    };
    let size: usize = size.parse().unwrap_or(0);
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    let Ok(cap) = arbor::node::sibling::Capability::parse(&line) else {
        return std::process::ExitCode::from(2);
    };
    let Ok(listener) = std::net::TcpListener::bind(bind) else {
        return std::process::ExitCode::from(2);
    };
    if let Ok(a) = listener.local_addr() {
        println!("listening {a}");
        let _ = std::io::stdout().flush();
    }
    let Ok((mut conn, _)) = listener.accept() else {
        return std::process::ExitCode::from(2);
    };
    let mut asked = [0u8; 64];
    let _ = conn.read_exact(&mut asked);
    let _ = conn.write_all(b"Y");
    let garbage = vec![0x5au8; size];
    let _ = arbor::node::sibling::send_sealed(&garbage[..], &mut conn, &cap.key, sha);
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let _ = conn.read(&mut [0u8; 1]);
    std::process::ExitCode::SUCCESS
}
