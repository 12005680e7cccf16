//! A test host of its own: a network namespace joined to this one by a veth pair, for a service
//! that a test can partition from NATS (the link taken down: packets dropped, no reset, as on a
//! real network) and join again. Every address is the test's own (a /30 of 10.213.0.0/16 on the
//! pair); nothing leaves the machine. Needs root (CAP_NET_ADMIN) and iproute2's `ip`.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A namespace and its link to the host. Deleted on drop.
pub struct Netns {
    name: String,
    host_if: String,
    /// The host's end of the pair: what the namespace reaches the host at.
    pub host_ip: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip").args(args).output().map_err(|e| format!("cannot run ip {args:?}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim()))
    }
}

impl Netns {
    /// Makes a namespace with a veth pair to the host, both ends up.
    pub fn create() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        // Names and subnets unique per test process and namespace: interface names hold 15
        // bytes, and parallel tests (and their processes) must not collide.
        let tag = (std::process::id() % 10_000) * 100 + NEXT.fetch_add(1, Ordering::SeqCst) % 100;
        let name = format!("cm{tag}");
        let (host_if, ns_if) = (format!("cmh{tag}"), format!("cmn{tag}"));
        let subnet = (tag % 16_384) * 4;
        let host_ip = Ipv4Addr::new(10, 213, (subnet >> 8) as u8, (subnet & 0xff) as u8 + 1);
        let ns_ip = Ipv4Addr::new(10, 213, (subnet >> 8) as u8, (subnet & 0xff) as u8 + 2);
        let made = Netns { name: name.clone(), host_if: host_if.clone(), host_ip };
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), name.clone()],
            vec![
                "link".into(),
                "add".into(),
                host_if.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                ns_if.clone(),
            ],
            vec!["link".into(), "set".into(), ns_if.clone(), "netns".into(), name.clone()],
            vec!["addr".into(), "add".into(), format!("{host_ip}/30"), "dev".into(), host_if.clone()],
            vec!["link".into(), "set".into(), host_if.clone(), "up".into()],
            vec![
                "-n".into(),
                name.clone(),
                "addr".into(),
                "add".into(),
                format!("{ns_ip}/30"),
                "dev".into(),
                ns_if.clone(),
            ],
            vec!["-n".into(), name.clone(), "link".into(), "set".into(), ns_if, "up".into()],
            vec!["-n".into(), name.clone(), "link".into(), "set".into(), "lo".into(), "up".into()],
        ];
        for step in steps {
            let args: Vec<&str> = step.iter().map(String::as_str).collect();
            if let Err(e) = ip(&args) {
                panic!("cannot make the test's network namespace {name} (needs root and iproute2): {e}");
            }
        }
        made
    }

    /// The host's address as seen from the namespace.
    pub fn host_addr(&self) -> IpAddr {
        self.host_ip.into()
    }

    /// The prefix that runs a program inside the namespace.
    pub fn prefix(&self) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.name.clone()]
    }

    /// Partitions the namespace from the host: the link goes down, packets are dropped.
    pub fn cut(&self) {
        ip(&["link", "set", &self.host_if, "down"]).expect("take the test's veth down");
    }

    /// Joins it again.
    pub fn restore(&self) {
        ip(&["link", "set", &self.host_if, "up"]).expect("bring the test's veth up");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the host's end deletes the pair; then the namespace.
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}
