//! `docker network rm` of a cluster network is final: no host makes the
//! network again while the removal goes through. Docker hides a network it
//! is removing from its listings before it calls the plugin, and the
//! record leaves etcd only when the plugin's `DeleteNetwork` is through; a
//! pass of portless's network sync in between (woken by the removal's own
//! etcd writes) used to make the network again for a moment, and on a busy
//! host it was still there when the test looked (CI saw it once).
//!
//! The window is milliseconds wide, so the test widens it the way a busy
//! CI machine does: two busy processes share the CPUs while it creates a
//! network on A, runs and removes a container on B, removes the network on
//! A and watches both hosts for it to come back, 15 times. Before the fix
//! it came back in 3 of 15 cycles on this 2-core machine.

#![allow(clippy::unwrap_used, clippy::disallowed_methods)]

mod common;

use std::time::{Duration, Instant};

use common::engines::{Engines, fail_with_logs, plugin_sidecars, wait};

const CYCLES: usize = 15;

fn present(e: &Engines, h: char, net: &str) -> bool {
    e.docker(h, &["network", "inspect", net]).status.success()
}

#[test]
fn a_removed_network_is_not_made_again_under_load() {
    let e = Engines::up();
    let (a, b) = plugin_sidecars(&e, &[]);
    let image = e.image();
    let net = format!("{}-net", e.pfx);
    // Busy processes in sessions of their own (the kernel's autogroups
    // share the CPUs among sessions): dockerd and portless slowed down as
    // on a loaded host. Threads of this test would slow down only this
    // test's session.
    let mut burners: Vec<std::process::Child> = (0..2)
        .map(|_| {
            std::process::Command::new("setsid")
                .arg("yes")
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("setsid (util-linux) and yes (coreutils) keep the CPUs busy")
        })
        .collect();
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cycles(&e, &image, &net)));
    for burner in &mut burners {
        let _ = burner.kill();
        let _ = burner.wait();
    }
    for i in 0..CYCLES {
        let _ = e.docker('B', &["rm", "-f", &format!("{}-c{i}", e.pfx)]);
    }
    for h in ['A', 'B'] {
        let _ = e.docker(h, &["network", "rm", &net]);
    }
    fail_with_logs(result, &a, &b);
}

fn cycles(e: &Engines, image: &str, net: &str) {
    let mut back = Vec::new();
    for i in 0..CYCLES {
        e.docker_ok(
            'A',
            &[&common::CREATE_PORTLESS_NETWORK[..], &[net]].concat(),
        );
        wait("the network on B", 5.0, || present(e, 'B', net));
        let c = format!("{}-c{i}", e.pfx);
        e.docker_ok(
            'B',
            &[
                "run",
                "-d",
                "--name",
                &c,
                "--network",
                net,
                image,
                "sleep",
                "1000",
            ],
        );
        std::thread::sleep(Duration::from_millis(300));
        e.docker_ok('B', &["rm", "-f", &c]);
        e.docker_ok('A', &["network", "rm", net]);
        // A must never have it again; B loses it within a second of the
        // record going (checked from 1.5 s on).
        let watched = Instant::now();
        let mut seen = None;
        while watched.elapsed() < Duration::from_millis(2500) {
            let late = watched.elapsed() > Duration::from_millis(1500);
            for h in ['A', 'B'] {
                if seen.is_none() && (h == 'A' || late) && present(e, h, net) {
                    seen = Some((h, watched.elapsed().as_millis()));
                }
            }
        }
        if let Some((h, ms)) = seen {
            back.push(format!("cycle {i}: on {h} {ms} ms after the removal"));
        }
        wait("the network gone from A", 5.0, || !present(e, 'A', net));
        wait("the network gone from B", 5.0, || !present(e, 'B', net));
    }
    assert!(
        back.is_empty(),
        "the removed network came back in {} of {CYCLES} cycles:\n{}",
        back.len(),
        back.join("\n")
    );
}
