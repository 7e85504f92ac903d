//! Where the data path's random identifiers come from (checkpoint write
//! ids, full-sync marker ids, lease record nonces): from the OS in
//! production, from a seed in the simulator, so a seed replays the same
//! bytes and the same schedule.

use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug)]
pub struct Ids(Arc<Mutex<StdRng>>);

impl Ids {
    /// Seeded from the operating system's entropy.
    pub fn from_entropy() -> Self {
        Self(Arc::new(Mutex::new(StdRng::from_entropy())))
    }

    /// The same sequence for the same seed.
    pub fn seeded(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(StdRng::seed_from_u64(seed))))
    }

    pub fn next(&self) -> u64 {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .gen()
    }
}

impl Default for Ids {
    fn default() -> Self {
        Self::from_entropy()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_ids_and_clones_share_one_sequence() {
        let (a, b) = (Ids::seeded(7), Ids::seeded(7));
        let first: Vec<u64> = (0..4).map(|_| a.next()).collect();
        assert_eq!(first, (0..4).map(|_| b.next()).collect::<Vec<_>>());
        let shared = a.clone();
        assert_ne!(shared.next(), a.next(), "one sequence, not two copies");
    }
}
