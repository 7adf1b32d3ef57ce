//! Slot changes (a server's address, port, weight, maintenance) straight through HAProxy's
//! runtime API, one short exchange per slot on the stats socket.
//!
//! Why not the Dataplane API's live server replace: v1.2.5 turns every such PUT into a runtime
//! call *and* an implicit transaction that rewrites and validates the whole configuration with
//! `haproxy -c`, so each change cost a full validation (about 0.6 s of CPU with 1,000 TLS
//! servers) and a batch of N changes cost N of them. Here a batch costs N socket round trips;
//! the applier then writes the file once for the whole batch (see `apply`).

use std::path::Path;

use crate::error::{Error, Result};
use crate::haproxy::diff::ServerSpec;
use crate::haproxy::runtime;
use crate::objects::CHECK_DYNAMIC;

/// The runtime API commands that bring one slot to `s`, on one line (`;`-separated). A slot
/// leaving service goes into maintenance before its address changes, one entering service gets
/// its address and weight before it leaves maintenance, so no request ever reaches a
/// half-changed slot. A checked slot entering service has its check turned on (a dynamic
/// server is added with it off, see `add_server`; for a server of the file it already is, and
/// turning it on again changes nothing, a down server stays down) and its check port set to
/// its port (which HAProxy takes only once the check is on). Leaving maintenance, HAProxy
/// counts a checked server up and checks it at once: a new instance takes traffic at once, and
/// leaves the rotation again if its sidecar does not answer. In maintenance, nothing is
/// checked.
pub fn commands(s: &ServerSpec) -> String {
    let id = format!("{}/{}", s.backend, s.name);
    let addr = format!("set server {id} addr {} port {}", s.address, s.port);
    let weight = s.weight.map(|w| format!("set server {id} weight {w}"));
    let mut cmds = Vec::with_capacity(5);
    if s.maintenance {
        cmds.push(format!("set server {id} state maint"));
        cmds.push(addr);
        cmds.extend(weight);
    } else {
        cmds.push(addr);
        cmds.extend(weight);
        if s.check_inter_ms.is_some() {
            cmds.push(format!("enable health {id}"));
            cmds.push(format!("set server {id} check-port {}", s.port));
        }
        cmds.push(format!("set server {id} state ready"));
    }
    cmds.join("; ")
}

/// Whether HAProxy's answer to `commands` says every command went through: `set server addr`
/// answers with what changed (or that nothing needed to), `weight` and `state` answer nothing.
pub fn accepted(answer: &str) -> bool {
    answer.lines().map(str::trim).all(|l| {
        l.is_empty()
            || l.starts_with("IP changed from")
            || l.starts_with("port changed from")
            || l.starts_with("no need to change")
    })
}

/// Applies one slot change through the stats socket at `stats`.
pub fn set_server(stats: &Path, s: &ServerSpec) -> Result<()> {
    let answer = runtime::command(stats, &commands(s), None)?;
    if accepted(&answer) {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "HAProxy refused the change of server {}/{}: {}",
            s.backend,
            s.name,
            answer.trim()
        )))
    }
}

/// The `add server` command of a new slot: the options the file gives it, and what a server
/// of the file inherits from `default-server` lines, since a dynamic server inherits nothing.
pub fn add_command(s: &ServerSpec) -> String {
    // The passive check's `rise` must come after the repeated `default-server` options.
    let line = ServerSpec {
        passive: None,
        ..s.clone()
    }
    .line();
    let mut options: Vec<String> = line
        .split_whitespace()
        .skip(2) // "server <name>"
        .filter(|w| *w != "disabled")
        .map(str::to_string)
        .collect();
    if let Some(v) = &s.verifyhost {
        options.extend(["verifyhost".to_string(), v.clone()]);
    }
    if s.check_inter_ms.is_some() {
        options.extend(CHECK_DYNAMIC.split_whitespace().map(str::to_string));
        options.extend(["port".to_string(), s.port.to_string()]);
    }
    options.extend(
        s.passive
            .iter()
            .flat_map(|p| p.split_whitespace().map(str::to_string)),
    );
    format!("add server {}/{} {}", s.backend, s.name, options.join(" "))
}

/// A new slot as a dynamic server (HAProxy 2.4+ `add server`, with the same options the file
/// gives it); HAProxy adds it in maintenance with its check off (a check turned on in
/// maintenance would run there: `commands` turns it on as the slot enters service), and it is
/// then brought to `s` like any slot.
pub fn add_server(stats: &Path, s: &ServerSpec) -> Result<()> {
    let id = format!("{}/{}", s.backend, s.name);
    let answer = runtime::command(stats, &add_command(s), None)?;
    if !answer.contains("New server registered") {
        return Err(Error::msg(format!(
            "HAProxy refused to add server {id}: {}",
            answer.trim()
        )));
    }
    set_server(stats, s)
}

/// Sets one key of a map HAProxy has loaded (the splits map): `set map` answers nothing when
/// it went through.
pub fn set_map(stats: &Path, map: &Path, key: &str, value: &str) -> Result<()> {
    let answer = runtime::command(
        stats,
        &format!("set map {} {key} {value}", map.display()),
        None,
    )?;
    if answer.trim().is_empty() {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "HAProxy refused to set {key} in map {}: {}",
            map.display(),
            answer.trim()
        )))
    }
}

/// Replaces every entry of a map HAProxy has loaded, atomically: a new version is prepared,
/// filled in order (the order `map_reg` looks entries up in) and committed, so a lookup sees
/// either the old entries or the new ones, never a mix. Each step answers nothing when it went
/// through.
pub fn replace_map(stats: &Path, map: &Path, entries: &[(String, String)]) -> Result<()> {
    let map_name = map.display();
    let refused = |step: &str, answer: &str| {
        Error::msg(format!(
            "HAProxy refused to {step} map {map_name}: {}",
            answer.trim()
        ))
    };
    let answer = runtime::command(stats, &format!("prepare map {map_name}"), None)?;
    let version = answer
        .trim()
        .strip_prefix("New version created:")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or_else(|| refused("prepare a new version of", &answer))?;
    if !entries.is_empty() {
        let payload: String = entries.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
        let answer = runtime::command(
            stats,
            &format!("add map @{version} {map_name}"),
            Some(&payload),
        )?;
        if !answer.trim().is_empty() {
            return Err(refused("fill the new version of", &answer));
        }
    }
    let answer = runtime::command(stats, &format!("commit map @{version} {map_name}"), None)?;
    if answer.trim().is_empty() {
        Ok(())
    } else {
        Err(refused("commit the new version of", &answer))
    }
}

/// Removes a slot: into maintenance, then deleted (HAProxy refuses while it has connections).
pub fn del_server(stats: &Path, backend: &str, name: &str) -> Result<()> {
    let id = format!("{backend}/{name}");
    let answer = runtime::command(
        stats,
        &format!("set server {id} state maint; del server {id}"),
        None,
    )?;
    if !answer.contains("Server deleted") {
        return Err(Error::msg(format!(
            "HAProxy refused to delete server {id}: {}",
            answer.trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(maintenance: bool) -> ServerSpec {
        ServerSpec {
            backend: "up_server".into(),
            name: "s3".into(),
            address: "10.0.0.5".into(),
            port: 21000,
            weight: Some(7),
            tls: None,
            maintenance,
            h2: false,
            verifyhost: None,
            alpn: None,
            check_inter_ms: Some(400),
            maxconn: None,
            passive: None,
        }
    }

    #[test]
    fn a_slot_entering_service_is_addressed_and_weighted_before_it_is_ready() {
        assert_eq!(
            commands(&spec(false)),
            "set server up_server/s3 addr 10.0.0.5 port 21000; set server up_server/s3 weight 7; enable health up_server/s3; set server up_server/s3 check-port 21000; set server up_server/s3 state ready"
        );
        let unchecked = ServerSpec {
            check_inter_ms: None,
            ..spec(false)
        };
        assert!(!commands(&unchecked).contains("health"));
        assert!(!commands(&unchecked).contains("check-port"));
    }

    /// A dynamic server is checked as one of the file: same interval, fall and rise, and a
    /// plain TCP check (an explicit check port, since `add server` refuses `no-check-ssl`).
    #[test]
    fn a_dynamic_slot_is_checked_like_one_of_the_file() {
        let cmd = add_command(&spec(true));
        assert!(
            cmd.starts_with("add server up_server/s3 10.0.0.5:21000 weight 7 check inter 400"),
            "{cmd}"
        );
        assert!(cmd.ends_with(" fall 2 rise 1 port 21000"), "{cmd}");
        assert!(!cmd.contains("disabled") && !cmd.contains("no-check-ssl"));
        assert_eq!(
            crate::objects::CHECK_DEFAULTS.strip_suffix(" no-check-ssl"),
            Some(CHECK_DYNAMIC)
        );
    }

    #[test]
    fn a_slot_leaving_service_goes_into_maintenance_first() {
        assert!(commands(&spec(true)).starts_with("set server up_server/s3 state maint; "));
        // Nothing about its check: HAProxy pauses it in maintenance, and a dynamic slot's
        // check, off until it first enters service, takes no check port.
        assert!(!commands(&spec(true)).contains("health"));
        assert!(!commands(&spec(true)).contains("check-port"));
    }

    #[test]
    fn answers_of_haproxy_2_6_are_judged() {
        // As HAProxy 2.6.12 answered these commands.
        assert!(accepted(
            "IP changed from '127.0.0.1' to '10.0.0.5', port changed from '1' to '21000' by 'stats socket command'\n\n"
        ));
        assert!(accepted(
            "no need to change the addr, port changed from '1' to '2' by 'stats socket command'\n"
        ));
        assert!(accepted("\n"));
        assert!(!accepted("No such server.\n"));
        assert!(!accepted(
            "Backend is using a static LB algorithm and only accepts weights '0%' and '100%'.\n"
        ));
    }
}
