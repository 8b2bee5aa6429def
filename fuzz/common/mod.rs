//! Helpers shared by the fuzz targets (included with `#[path]`).

#![allow(dead_code)]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

/// Runs a future that only reads and writes memory: such a future never
/// waits, so one poll must finish it (a second one would mean it waits on
/// something that will never come, a hang the target reports).
pub fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..2 {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("a future over in-memory bytes did not finish");
}

/// Splits `data` into pieces at the cut points the first bytes choose: the
/// same stream, arriving in other frames.
pub fn split_by_seed(seed: &[u8], data: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut cuts: Vec<usize> = seed
        .iter()
        .map(|b| {
            if data.is_empty() {
                0
            } else {
                *b as usize * 7 % (data.len() + 1)
            }
        })
        .collect();
    cuts.push(0);
    cuts.push(data.len());
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2).map(|w| w[0]..w[1]).collect()
}
