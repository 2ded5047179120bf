//! Choosing a backend. Pure: the caller passes each backend's state, whether
//! it is currently ejected, and a round-robin counter.
//!
//! Algorithm: round-robin over the best tier of eligible backends. Replicas
//! of one container image are alike, so an even spread is what is wanted, and
//! round-robin gives an exactly even one at any concurrency (least-requests
//! or power-of-two-choices spread unevenly while load is light, and need an
//! in-flight counter written on every request). Slow or failing replicas are
//! handled by passive ejection instead.
//!
//! Tiers, best first:
//! 1. healthy (or no healthcheck) and not ejected;
//! 2. healthcheck starting and not ejected, used only when tier 1 is empty;
//! 3. healthy or starting but ejected ("panic mode", as in Envoy): when
//!    every live backend has been ejected, trying one beats a certain 503.
//!
//! Unhealthy and draining backends are never chosen.

use crate::table::BackendState;

/// What the balancer needs to know about one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub state: BackendState,
    pub ejected: bool,
}

fn tier(c: Candidate) -> Option<u8> {
    match (c.state, c.ejected) {
        (BackendState::Healthy, false) => Some(0),
        (BackendState::Starting, false) => Some(1),
        (BackendState::Healthy | BackendState::Starting, true) => Some(2),
        (BackendState::Unhealthy | BackendState::Draining, _) => None,
    }
}

/// Pick a backend index. `counter` is a round-robin counter the caller
/// increments per request; `tried` lists indices this request already
/// failed on (a retry never goes back to them). `None`: no backend left.
pub fn pick(
    n: usize,
    candidate: impl Fn(usize) -> Candidate,
    counter: usize,
    tried: &[usize],
) -> Option<usize> {
    let best = (0..n)
        .filter(|i| !tried.contains(i))
        .filter_map(|i| tier(candidate(i)))
        .min()?;
    // Round-robin over the members of the best tier only: skipping
    // ineligible slots of the full list would hand their share to the next
    // eligible backend.
    let eligible = |i: &usize| !tried.contains(i) && tier(candidate(*i)) == Some(best);
    let count = (0..n).filter(eligible).count();
    (0..n).filter(eligible).nth(counter % count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use BackendState::*;
    use proptest::prelude::*;

    fn c(state: BackendState, ejected: bool) -> Candidate {
        Candidate { state, ejected }
    }

    #[test]
    fn round_robin_is_even_over_healthy() {
        let cs = [c(Healthy, false), c(Healthy, false), c(Healthy, false)];
        let mut counts = [0; 3];
        for k in 0..300 {
            counts[pick(3, |i| cs[i], k, &[]).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn round_robin_is_even_with_ineligible_backends_between() {
        let cs = [
            c(Healthy, false),
            c(Draining, false),
            c(Unhealthy, false),
            c(Healthy, false),
        ];
        let mut counts = [0; 4];
        for k in 0..100 {
            counts[pick(4, |i| cs[i], k, &[]).unwrap()] += 1;
        }
        assert_eq!(counts, [50, 0, 0, 50]);
    }

    #[test]
    fn starting_only_when_no_healthy() {
        let cs = [c(Starting, false), c(Healthy, false)];
        for k in 0..10 {
            assert_eq!(pick(2, |i| cs[i], k, &[]), Some(1));
        }
        let cs = [c(Starting, false), c(Unhealthy, false)];
        assert_eq!(pick(2, |i| cs[i], 1, &[]), Some(0));
    }

    #[test]
    fn draining_and_unhealthy_never_chosen() {
        let cs = [c(Draining, false), c(Unhealthy, false)];
        assert_eq!(pick(2, |i| cs[i], 0, &[]), None);
        assert_eq!(pick(0, |_| c(Healthy, false), 0, &[]), None);
    }

    #[test]
    fn ejected_used_only_in_panic_and_retry_skips_tried() {
        let cs = [c(Healthy, true), c(Healthy, false)];
        assert_eq!(pick(2, |i| cs[i], 0, &[]), Some(1));
        assert_eq!(pick(2, |i| cs[i], 0, &[1]), Some(0));
        assert_eq!(pick(2, |i| cs[i], 0, &[0, 1]), None);
    }

    proptest! {
        #[test]
        fn pick_returns_an_allowed_backend_of_the_best_tier(
            states in prop::collection::vec(
                (prop::sample::select(vec![Healthy, Starting, Unhealthy, Draining]), any::<bool>()), 0..8),
            counter in any::<usize>(),
            tried in prop::collection::vec(0usize..8, 0..3),
        ) {
            let cs: Vec<Candidate> = states.iter().map(|&(s, e)| c(s, e)).collect();
            let got = pick(cs.len(), |i| cs[i], counter, &tried);
            let best = (0..cs.len()).filter(|i| !tried.contains(i)).filter_map(|i| tier(cs[i])).min();
            match got {
                None => prop_assert!(best.is_none()),
                Some(i) => {
                    prop_assert!(!tried.contains(&i));
                    prop_assert_eq!(tier(cs[i]), best);
                }
            }
        }
    }
}
