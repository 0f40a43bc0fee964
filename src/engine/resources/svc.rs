//! `svc`: a systemd service running or stopped, enabled or disabled at boot.
//!
//! After mgmt's svc resource: the unit is the name with `.service` added; `state` (running,
//! stopped) and `startup` (enabled, disabled) are each left alone when not given. A refresh (a
//! notify edge fired) reloads the service, or restarts it if it cannot reload, as mgmt's
//! `ReloadOrTryRestartUnit` does, unless the same check started or stopped it.
//!
//! The check reads the unit with `systemctl show` and acts with `systemctl` (start and stop
//! wait for their job, in mode `fail`, as mgmt). The watch is systemd's own signals: a D-Bus
//! connection to systemd's private socket (`/run/systemd/private`, no bus daemon needed)
//! subscribed to its events, filtered to this unit (its properties changed, it was loaded or
//! unloaded) and to the manager's unit files changing and daemon reloads ending. A service
//! stopped by hand is started again as soon as systemd says so.

use super::meta::Meta;
use super::pkg::{failed, output};
use super::{ApplyContext, Kind, Outcome, Poke, Resource, ResourceId};
use anyhow::{Context as _, bail};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SvcState {
    Running,
    Stopped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SvcStartup {
    Enabled,
    Disabled,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SvcSpec {
    /// The unit without `.service`, as in mgmt.
    pub name: String,
    /// `None`: whether it runs is left alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<SvcState>,
    /// `None`: whether it starts at boot is left alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup: Option<SvcStartup>,
    #[serde(default, skip_serializing_if = "Meta::is_default")]
    pub meta: Meta,
}

/// A usable service name: systemd's unit name characters, no `/`, not an option.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('-')
        && name.len() < 250
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c))
}

/// What `systemctl show` says of a unit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnitStatus {
    pub load: String,
    pub active: String,
    pub unit_file: String,
    pub need_reload: bool,
}

/// Parses `systemctl show -p LoadState,ActiveState,UnitFileState,NeedDaemonReload UNIT`.
pub fn parse_show(out: &str) -> UnitStatus {
    let props: BTreeMap<&str, &str> = out
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    let get = |k: &str| props.get(k).copied().unwrap_or("").to_string();
    UnitStatus {
        load: get("LoadState"),
        active: get("ActiveState"),
        unit_file: get("UnitFileState"),
        need_reload: get("NeedDaemonReload") == "yes",
    }
}

/// What a check does, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SvcPlan {
    pub daemon_reload: bool,
    pub startup: Option<SvcStartup>,
    pub state: Option<SvcState>,
    /// Reload (or restart) the service: refreshed and neither started nor stopped.
    pub reload: bool,
}

impl SvcPlan {
    pub fn is_empty(&self) -> bool {
        self.startup.is_none() && self.state.is_none() && !self.reload
    }
}

/// Decides what to do for `spec` given the unit's status, as mgmt: running means `active`
/// (activating, reloading, deactivating and failed are not running); enabled and disabled
/// mean exactly those unit file states.
pub fn plan(
    spec: &SvcSpec,
    unit: &str,
    status: &UnitStatus,
    refresh: bool,
) -> anyhow::Result<SvcPlan> {
    if status.load == "not-found" || status.load.is_empty() {
        bail!("no unit {unit} on this host");
    }
    if status.load == "masked" && spec.state == Some(SvcState::Running) {
        bail!("{unit} is masked: it cannot be started");
    }
    let running = status.active == "active";
    let state = spec.state.filter(|s| match s {
        SvcState::Running => !running,
        SvcState::Stopped => running,
    });
    let startup = spec.startup.filter(|s| match s {
        SvcStartup::Enabled => status.unit_file != "enabled",
        SvcStartup::Disabled => status.unit_file != "disabled",
    });
    let mut p = SvcPlan {
        daemon_reload: false,
        startup,
        state,
        reload: refresh && state.is_none(),
    };
    p.daemon_reload = status.need_reload && !p.is_empty();
    Ok(p)
}

pub struct SvcResource {
    id: ResourceId,
    spec: SvcSpec,
    unit: String,
}

impl SvcResource {
    pub fn new(spec: SvcSpec) -> Self {
        SvcResource {
            id: ResourceId::new(Kind::Svc, spec.name.clone()),
            unit: format!("{}.service", spec.name),
            spec,
        }
    }

    /// The unit's status; asked twice, a second apart, if systemd does not answer (it is
    /// re-executing or reloading: `Transport endpoint is not connected`).
    async fn status(&self) -> anyhow::Result<UnitStatus> {
        match self.status_once().await {
            Ok(status) => Ok(status),
            Err(e) => {
                tracing::debug!("{}: {e:#}; asking again in 1 s", self.id);
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.status_once().await
            }
        }
    }

    async fn status_once(&self) -> anyhow::Result<UnitStatus> {
        let out = output(
            "systemctl",
            &[
                "show",
                "-p",
                "LoadState,ActiveState,UnitFileState,NeedDaemonReload",
                "--",
                &self.unit,
            ],
        )
        .await?;
        if !out.status.success() {
            return Err(failed(&format!("systemctl show {}", self.unit), &out));
        }
        Ok(parse_show(&String::from_utf8_lossy(&out.stdout)))
    }

    async fn systemctl(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = args.to_vec();
        all.extend(["--", self.unit.as_str()]);
        let out = output("systemctl", &all).await?;
        if !out.status.success() {
            return Err(failed(&format!("systemctl {}", all.join(" ")), &out));
        }
        Ok(())
    }

    async fn check_apply_inner(&self, ctx: ApplyContext) -> anyhow::Result<Outcome> {
        if !Path::new("/run/systemd/system").is_dir() {
            bail!("systemd is not running on this host");
        }
        let unit = &self.unit;
        let status = self.status().await?;
        let p = plan(&self.spec, unit, &status, ctx.refresh)?;
        if p.is_empty() {
            return Ok(Outcome::Unchanged);
        }
        let mut what = Vec::new();
        if let Some(s) = p.startup {
            what.push(match s {
                SvcStartup::Enabled => format!("enable {unit} (it is {})", status.unit_file),
                SvcStartup::Disabled => format!("disable {unit} (it is {})", status.unit_file),
            });
        }
        if let Some(s) = p.state {
            what.push(match s {
                SvcState::Running => format!("start {unit} (it is {})", status.active),
                SvcState::Stopped => format!("stop {unit} (it is {})", status.active),
            });
        }
        if p.reload {
            what.push(format!("reload or restart {unit} (refreshed)"));
        }
        if ctx.noop {
            return Ok(Outcome::WouldChange(format!("would {}", what.join(", "))));
        }
        if p.daemon_reload {
            let out = output("systemctl", &["daemon-reload"]).await?;
            if !out.status.success() {
                return Err(failed("systemctl daemon-reload", &out));
            }
        }
        if let Some(s) = p.startup {
            match s {
                SvcStartup::Enabled => self.systemctl(&["enable", "--force"]).await?,
                SvcStartup::Disabled => self.systemctl(&["disable"]).await?,
            }
            let now = self.status().await?;
            let want = match s {
                SvcStartup::Enabled => "enabled",
                SvcStartup::Disabled => "disabled",
            };
            if now.unit_file != want {
                bail!(
                    "{unit} is {} after systemctl {}: its unit file cannot be {want} (a static \
                     or generated unit has no [Install] to act on)",
                    now.unit_file,
                    &want[..want.len() - 1]
                );
            }
        }
        if let Some(s) = p.state {
            match s {
                SvcState::Running => self.systemctl(&["start", "--job-mode=fail"]).await?,
                SvcState::Stopped => self.systemctl(&["stop", "--job-mode=fail"]).await?,
            }
        }
        if p.reload {
            self.systemctl(&["reload-or-try-restart", "--job-mode=fail"])
                .await?;
        }
        Ok(Outcome::Changed(
            what.iter().map(|w| past(w)).collect::<Vec<_>>().join(", "),
        ))
    }

    async fn watch_inner(&self, poke: Poke, cancel: CancellationToken) -> anyhow::Result<()> {
        if !Path::new("/run/systemd/system").is_dir() {
            // Nothing to watch: the check says why.
            cancel.cancelled().await;
            return Ok(());
        }
        let path = unit_path(&self.unit);
        let mut admitted = false;
        loop {
            let result = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = watch_systemd(&self.unit, &path, &poke, &mut admitted) => r,
            };
            // Never got in (not root, say): the watch fails, naming why.
            if !admitted {
                return result.context("watching systemd's signals");
            }
            // systemd re-executed (daemon-reexec) or went away: connect again, and check.
            let why = match &result {
                Ok(()) => "ended".to_string(),
                Err(e) => format!("{e:#}"),
            };
            tracing::debug!("{}: systemd's signals ended ({why}); again in 1 s", self.id);
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            poke.poke();
        }
    }
}

/// "enable x (it is y)" → "enabled x (it was y)".
fn past(what: &str) -> String {
    let what = what.replace("(it is ", "(it was ");
    for (verb, done) in [
        ("enable ", "enabled "),
        ("disable ", "disabled "),
        ("start ", "started "),
        ("stop ", "stopped "),
        ("reload or restart ", "reloaded or restarted "),
    ] {
        if let Some(rest) = what.strip_prefix(verb) {
            return format!("{done}{rest}");
        }
    }
    what
}

impl Resource for SvcResource {
    fn id(&self) -> &ResourceId {
        &self.id
    }

    fn check_apply(&self, ctx: ApplyContext) -> BoxFuture<'_, anyhow::Result<Outcome>> {
        Box::pin(self.check_apply_inner(ctx))
    }

    fn watch(&self, poke: Poke, cancel: CancellationToken) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(self.watch_inner(poke, cancel))
    }
}

/// A unit's D-Bus object path, as sd-bus encodes it: every byte but letters and digits (and
/// a leading digit) as `_xx`.
pub fn unit_path(unit: &str) -> String {
    let mut path = String::from("/org/freedesktop/systemd1/unit/");
    for (i, b) in unit.bytes().enumerate() {
        if b.is_ascii_alphabetic() || (b.is_ascii_digit() && i > 0) {
            path.push(b as char);
        } else {
            path.push_str(&format!("_{b:02x}"));
        }
    }
    path
}

const SYSTEMD_PRIVATE: &str = "/run/systemd/private";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";

/// Connects to systemd's private socket, subscribes to its signals, and pokes for each that
/// concerns `unit` (object path `path`). Returns when the connection ends.
/// `admitted` is set once systemd accepted the connection (its authentication): from then
/// on a connection that ends (systemd re-executing) is made again.
async fn watch_systemd(
    unit: &str,
    path: &str,
    poke: &Poke,
    admitted: &mut bool,
) -> anyhow::Result<()> {
    let stream = tokio::net::UnixStream::connect(SYSTEMD_PRIVATE)
        .await
        .with_context(|| format!("connect to {SYSTEMD_PRIVATE}"))?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    // SASL EXTERNAL: the kernel tells systemd who we are; we say the same uid.
    let uid = unsafe { libc::geteuid() };
    let hex: String = uid
        .to_string()
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    write
        .write_all(format!("\0AUTH EXTERNAL {hex}\r\n").as_bytes())
        .await?;
    let mut line = String::new();
    read.read_line(&mut line).await?;
    if !line.starts_with("OK ") {
        bail!("systemd refused the D-Bus authentication: {}", line.trim());
    }
    *admitted = true;
    write.write_all(b"BEGIN\r\n").await?;
    write
        .write_all(&method_call(
            1,
            "/org/freedesktop/systemd1",
            MANAGER,
            "Subscribe",
        ))
        .await?;
    // Subscribed from here: what happened before is what the first check sees.
    poke.poke();
    // systemd (sd-bus) may read our call together with BEGIN and then leave it unread until
    // more bytes come: until a reply, nudge it with a Ping (another call, answered in order
    // after Subscribe), soon and then every quarter second.
    let replied = std::sync::atomic::AtomicBool::new(false);
    let nudge = async {
        for serial in 2..=40 {
            let wait = if serial == 2 { 50 } else { 250 };
            tokio::time::sleep(Duration::from_millis(wait)).await;
            if replied.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            tracing::debug!("systemd has not answered Subscribe yet: Ping");
            write
                .write_all(&method_call(
                    serial,
                    "/org/freedesktop/systemd1",
                    "org.freedesktop.DBus.Peer",
                    "Ping",
                ))
                .await?;
        }
        if !replied.load(std::sync::atomic::Ordering::SeqCst) {
            bail!("systemd never answered Subscribe");
        }
        std::future::pending::<anyhow::Result<()>>().await
    };
    let signals = async {
        loop {
            let msg = read_message(&mut read).await?;
            tracing::trace!("systemd: {msg:?}");
            match msg.kind {
                // The reply to Subscribe (or to a Ping, which comes after it).
                2 => {
                    replied.store(true, std::sync::atomic::Ordering::SeqCst);
                    continue;
                }
                3 => bail!(
                    "systemd refused Subscribe: {}",
                    msg.error.unwrap_or_default()
                ),
                4 => {}
                _ => continue,
            }
            let ours = msg.path.as_deref() == Some(path)
                || (msg.interface.as_deref() == Some(MANAGER)
                    && match msg.member.as_deref() {
                        Some("UnitNew" | "UnitRemoved") => {
                            msg.first_string.as_deref() == Some(unit)
                        }
                        Some("UnitFilesChanged") => true,
                        // Reloading(false): a daemon-reload finished.
                        Some("Reloading") => msg.first_u32 == Some(0),
                        _ => false,
                    });
            if ours {
                tracing::trace!("systemd: {:?} {:?}", msg.member, msg.path);
                poke.poke();
            }
        }
    };
    tokio::select! {
        r = nudge => r,
        r = signals => r,
    }
}

fn pad(buf: &mut Vec<u8>, align: usize) {
    while !buf.len().is_multiple_of(align) {
        buf.push(0);
    }
}

/// One header field of a string type (`s`, or `o` for an object path).
fn field(buf: &mut Vec<u8>, code: u8, sig: u8, value: &str) {
    pad(buf, 8);
    buf.extend([code, 1, sig, 0]);
    pad(buf, 4);
    buf.extend((value.len() as u32).to_le_bytes());
    buf.extend(value.as_bytes());
    buf.push(0);
}

/// A D-Bus method call with no arguments, little-endian.
fn method_call(serial: u32, path: &str, interface: &str, member: &str) -> Vec<u8> {
    let mut buf = vec![b'l', 1, 0, 1];
    buf.extend(0u32.to_le_bytes()); // body length
    buf.extend(serial.to_le_bytes());
    buf.extend(0u32.to_le_bytes()); // header fields' length, set below
    let start = buf.len();
    field(&mut buf, 1, b'o', path);
    field(&mut buf, 2, b's', interface);
    field(&mut buf, 3, b's', member);
    field(&mut buf, 6, b's', "org.freedesktop.systemd1");
    let len = (buf.len() - start) as u32;
    buf[12..16].copy_from_slice(&len.to_le_bytes());
    pad(&mut buf, 8);
    buf
}

/// What the watch needs of a message.
#[derive(Debug, Default, PartialEq, Eq)]
struct Message {
    kind: u8,
    path: Option<String>,
    interface: Option<String>,
    member: Option<String>,
    error: Option<String>,
    /// The body's first value, if it is a string (UnitNew's unit name) ...
    first_string: Option<String>,
    /// ... or a boolean or uint32 (Reloading's flag).
    first_u32: Option<u32>,
}

async fn read_message(read: &mut (impl AsyncReadExt + Unpin)) -> anyhow::Result<Message> {
    let mut fixed = [0u8; 16];
    read.read_exact(&mut fixed).await?;
    let big = match fixed[0] {
        b'l' => false,
        b'B' => true,
        other => bail!("not a D-Bus message (endianness byte {other:#x})"),
    };
    let u32_at = |b: &[u8], at: usize| {
        let a = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if big {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        }
    };
    let body_len = u32_at(&fixed, 4) as usize;
    let fields_len = u32_at(&fixed, 12) as usize;
    let header_end = (16 + fields_len).next_multiple_of(8);
    let total = header_end + body_len;
    if total > 1 << 27 {
        bail!("a D-Bus message of {total} bytes");
    }
    let mut buf = fixed.to_vec();
    buf.resize(total, 0);
    read.read_exact(&mut buf[16..]).await?;
    parse_message(&buf, big, fields_len)
}

fn parse_message(buf: &[u8], big: bool, fields_len: usize) -> anyhow::Result<Message> {
    let u32_at = |at: usize| -> anyhow::Result<u32> {
        let b = buf.get(at..at + 4).context("truncated D-Bus message")?;
        let a = [b[0], b[1], b[2], b[3]];
        Ok(if big {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        })
    };
    let string_at = |at: usize| -> anyhow::Result<(String, usize)> {
        let len = u32_at(at)? as usize;
        let s = buf
            .get(at + 4..at + 4 + len)
            .context("truncated D-Bus string")?;
        Ok((String::from_utf8_lossy(s).into_owned(), at + 4 + len + 1))
    };
    let mut msg = Message {
        kind: buf[1],
        ..Message::default()
    };
    let end = 16 + fields_len;
    let mut pos = 16;
    let mut body_sig = String::new();
    while pos < end {
        pos = pos.next_multiple_of(8);
        if pos >= end {
            break;
        }
        let code = buf[pos];
        let sig_len = *buf.get(pos + 1).context("truncated header field")? as usize;
        let sig = buf
            .get(pos + 2..pos + 2 + sig_len)
            .context("truncated header field")?;
        pos += 2 + sig_len + 1;
        match sig {
            b"s" | b"o" => {
                pos = pos.next_multiple_of(4);
                let (s, next) = string_at(pos)?;
                pos = next;
                match code {
                    1 => msg.path = Some(s),
                    2 => msg.interface = Some(s),
                    3 => msg.member = Some(s),
                    4 => msg.error = Some(s),
                    _ => {}
                }
            }
            b"g" => {
                let len = *buf.get(pos).context("truncated signature")? as usize;
                let s = buf.get(pos + 1..pos + 1 + len).context("truncated")?;
                if code == 8 {
                    body_sig = String::from_utf8_lossy(s).into_owned();
                }
                pos += 1 + len + 1;
            }
            b"u" => {
                pos = pos.next_multiple_of(4) + 4;
            }
            other => bail!(
                "unknown D-Bus header field type {}",
                String::from_utf8_lossy(other)
            ),
        }
    }
    let body = end.next_multiple_of(8);
    match body_sig.as_bytes().first() {
        Some(b's' | b'o') if body < buf.len() => msg.first_string = Some(string_at(body)?.0),
        Some(b'b' | b'u') if body < buf.len() => msg.first_u32 = Some(u32_at(body)?),
        _ => {}
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(state: Option<SvcState>, startup: Option<SvcStartup>) -> SvcSpec {
        SvcSpec {
            name: "web".into(),
            state,
            startup,
            ..SvcSpec::default()
        }
    }

    fn status(active: &str, unit_file: &str) -> UnitStatus {
        UnitStatus {
            load: "loaded".into(),
            active: active.into(),
            unit_file: unit_file.into(),
            need_reload: false,
        }
    }

    #[test]
    fn systemctl_show_output_parses() {
        let out = "LoadState=loaded\nActiveState=inactive\nUnitFileState=disabled\n\
                   NeedDaemonReload=yes\n";
        assert_eq!(
            parse_show(out),
            UnitStatus {
                load: "loaded".into(),
                active: "inactive".into(),
                unit_file: "disabled".into(),
                need_reload: true
            }
        );
        assert_eq!(parse_show("LoadState=not-found\n").load, "not-found");
    }

    #[test]
    fn the_plan_does_only_what_differs() {
        let s = spec(Some(SvcState::Running), Some(SvcStartup::Enabled));
        let p = plan(&s, "web.service", &status("inactive", "disabled"), false).unwrap();
        assert_eq!(p.startup, Some(SvcStartup::Enabled));
        assert_eq!(p.state, Some(SvcState::Running));
        assert!(!p.reload);
        assert!(
            plan(&s, "web.service", &status("active", "enabled"), false)
                .unwrap()
                .is_empty()
        );
        // As mgmt: activating, failed and the like are not running.
        for active in ["activating", "failed", "deactivating", "inactive"] {
            let p = plan(&s, "web.service", &status(active, "enabled"), false).unwrap();
            assert_eq!(p.state, Some(SvcState::Running), "{active}");
        }
        let stop = spec(Some(SvcState::Stopped), Some(SvcStartup::Disabled));
        let p = plan(&stop, "web.service", &status("active", "enabled"), false).unwrap();
        assert_eq!(
            (p.state, p.startup),
            (Some(SvcState::Stopped), Some(SvcStartup::Disabled))
        );
        // Neither given: anything goes.
        assert!(
            plan(
                &spec(None, None),
                "web.service",
                &status("failed", "static"),
                false
            )
            .unwrap()
            .is_empty()
        );
    }

    #[test]
    fn a_refresh_reloads_unless_the_check_starts_or_stops_it() {
        let s = spec(Some(SvcState::Running), None);
        let p = plan(&s, "web.service", &status("active", "enabled"), true).unwrap();
        assert!(p.reload && p.state.is_none());
        let p = plan(&s, "web.service", &status("inactive", "enabled"), true).unwrap();
        assert!(!p.reload && p.state == Some(SvcState::Running));
    }

    #[test]
    fn a_missing_unit_fails_and_a_stale_one_is_reloaded_first() {
        let s = spec(Some(SvcState::Running), None);
        let mut st = status("inactive", "disabled");
        st.load = "not-found".into();
        let err = plan(&s, "web.service", &st, false).unwrap_err().to_string();
        assert!(err.contains("no unit web.service"), "{err}");
        let mut st = status("inactive", "disabled");
        st.need_reload = true;
        assert!(plan(&s, "web.service", &st, false).unwrap().daemon_reload);
        // Nothing to do: no daemon-reload either.
        let mut st = status("active", "disabled");
        st.need_reload = true;
        assert!(!plan(&s, "web.service", &st, false).unwrap().daemon_reload);
    }

    #[test]
    fn unit_paths_are_escaped_as_sd_bus_does() {
        assert_eq!(
            unit_path("web.service"),
            "/org/freedesktop/systemd1/unit/web_2eservice"
        );
        assert_eq!(
            unit_path("arbor-test.service"),
            "/org/freedesktop/systemd1/unit/arbor_2dtest_2eservice"
        );
        assert_eq!(
            unit_path("0ad.service"),
            "/org/freedesktop/systemd1/unit/_30ad_2eservice"
        );
    }

    #[test]
    fn names_are_unit_names_and_never_options() {
        assert!(valid_name("nginx") && valid_name("getty@tty1") && valid_name("a_b-c.d"));
        assert!(!valid_name("") && !valid_name("-x") && !valid_name("a/b") && !valid_name("a b"));
    }

    /// A signal as systemd sends one: header fields path, interface, member, signature.
    fn signal(path: &str, interface: &str, member: &str, sig: &str, body: &[u8]) -> Vec<u8> {
        let mut buf = vec![b'l', 4, 1, 1];
        buf.extend((body.len() as u32).to_le_bytes());
        buf.extend(7u32.to_le_bytes());
        buf.extend(0u32.to_le_bytes());
        let start = buf.len();
        field(&mut buf, 1, b'o', path);
        field(&mut buf, 2, b's', interface);
        field(&mut buf, 3, b's', member);
        pad(&mut buf, 8);
        buf.extend([8, 1, b'g', 0, sig.len() as u8]);
        buf.extend(sig.as_bytes());
        buf.push(0);
        let len = (buf.len() - start) as u32;
        buf[12..16].copy_from_slice(&len.to_le_bytes());
        pad(&mut buf, 8);
        buf.extend(body);
        buf
    }

    #[tokio::test]
    async fn signals_parse_with_their_path_member_and_first_argument() {
        let mut body = 11u32.to_le_bytes().to_vec();
        body.extend(b"web.service\0");
        body.extend([0; 3]);
        let bytes = signal("/org/freedesktop/systemd1", MANAGER, "UnitNew", "so", &body);
        let msg = read_message(&mut bytes.as_slice()).await.expect("parse");
        assert_eq!(msg.kind, 4);
        assert_eq!(msg.path.as_deref(), Some("/org/freedesktop/systemd1"));
        assert_eq!(msg.member.as_deref(), Some("UnitNew"));
        assert_eq!(msg.first_string.as_deref(), Some("web.service"));
        let bytes = signal(
            "/org/freedesktop/systemd1",
            MANAGER,
            "Reloading",
            "b",
            &0u32.to_le_bytes(),
        );
        let msg = read_message(&mut bytes.as_slice()).await.expect("parse");
        assert_eq!(msg.first_u32, Some(0));
        // Our own call parses back too.
        let call = method_call(1, "/org/freedesktop/systemd1", MANAGER, "Subscribe");
        let msg = read_message(&mut call.as_slice()).await.expect("parse");
        assert_eq!(
            (msg.kind, msg.member.as_deref(), msg.interface.as_deref()),
            (1, Some("Subscribe"), Some(MANAGER))
        );
    }

    #[test]
    fn changes_are_said_in_the_past() {
        assert_eq!(
            past("start web.service (it is inactive)"),
            "started web.service (it was inactive)"
        );
    }
}
