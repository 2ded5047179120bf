//! The host's interface addresses, read in one place: host-side DNS
//! clients (every interface) and a bridge network's gateway (one
//! interface) come from here.

use std::net::IpAddr;

/// The IPv4 and IPv6 addresses of interface `name`, or of every interface
/// when `name` is None. Empty when they cannot be read.
pub fn addrs(name: Option<&str>) -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter(|ifa| name.is_none_or(|n| ifa.interface_name == n))
        .filter_map(|ifa| ifa.address)
        .filter_map(|a| match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
            (Some(v4), _) => Some(IpAddr::V4(v4.ip())),
            (_, Some(v6)) => Some(IpAddr::V6(v6.ip())),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_is_among_every_interfaces_and_lo_has_it() {
        let lo = super::addrs(Some("lo"));
        assert!(lo.iter().any(|a| a.is_loopback()), "{lo:?}");
        let all = super::addrs(None);
        assert!(lo.iter().all(|a| all.contains(a)), "{all:?}");
        assert!(super::addrs(Some("no-such-interface0")).is_empty());
    }
}
