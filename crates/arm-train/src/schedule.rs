//! Learning-rate schedules, a pure function of the epoch (so a resumed run needs no state):
//! - constant: lr;
//! - exponential: lr * lr_decay^(e - 1), the per-epoch form of PixelCNN++'s decay (Salimans et
//!   al. 2017 decay the rate by 0.999995 per step);
//! - cosine: lr_min + (lr - lr_min) (1 + cos(pi t)) / 2 with t going from 0 at the end of the
//!   warm-up to 1 at max_epochs (Loshchilov & Hutter 2017, SGDR, eq. 5, one cycle).
//!
//! Any schedule can start with `warmup_epochs` of linear warm-up, lr * e / (warmup + 1) in
//! epoch e <= warmup (Goyal et al. 2017, §2.2), so the first epoch does not start at zero.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    #[default]
    Constant,
    Exponential,
    Cosine,
}

/// The learning rate of `epoch` (1-based) under the schedule.
pub fn lr_at(
    schedule: Schedule,
    (lr, lr_decay, min_lr): (f64, f64, f64),
    (epoch, warmup, max_epochs): (usize, usize, usize),
) -> f64 {
    if epoch <= warmup {
        return lr * epoch as f64 / (warmup + 1) as f64;
    }
    match schedule {
        Schedule::Constant => lr,
        Schedule::Exponential => lr * lr_decay.powi((epoch - 1 - warmup) as i32),
        Schedule::Cosine => {
            let span = max_epochs.saturating_sub(warmup).max(1) as f64;
            let t = ((epoch - 1 - warmup) as f64 / span).min(1.0);
            min_lr + (lr - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_hand_computed_values() {
        let c = |e| lr_at(Schedule::Constant, (0.01, 0.5, 0.0), (e, 0, 10));
        assert_eq!((c(1), c(7)), (0.01, 0.01));
        let x = |e| lr_at(Schedule::Exponential, (0.01, 0.5, 0.0), (e, 0, 10));
        assert_eq!((x(1), x(2), x(4)), (0.01, 0.005, 0.00125));
        // Cosine over 4 epochs after 1 warm-up epoch: t = 0, 1/4, 1/2, 3/4 in epochs 2..5.
        // python: [0.001 + 0.009 * (1 + math.cos(math.pi * t)) / 2 for t in (0, .25, .5, .75)]
        let cs = |e| lr_at(Schedule::Cosine, (0.01, 1.0, 0.001), (e, 1, 5));
        assert_eq!(cs(1), 0.005, "warm-up: lr * 1 / 2");
        let want = [0.01, 0.008_681_980_515_339_464, 0.0055, 0.002_318_019_484_660_536];
        for (e, w) in (2..=5).zip(want) {
            assert!((cs(e) - w).abs() < 1e-15, "epoch {e}: {} vs {w}", cs(e));
        }
        assert!((cs(9) - 0.001).abs() < 1e-15, "the floor after max_epochs");
    }
}
