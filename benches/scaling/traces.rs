//! Ticket arrival traces: CSV files (`arrival_s,run_s`) and the seeded generator that
//! wrote the shipped ones (benches/traces/). The generator has its own small random
//! number generator (SplitMix64), so the files it writes do not depend on a crate's
//! version.

use std::f64::consts::PI;
use std::path::Path;

use crate::sim::Ticket;

/// A shipped trace: its file name (without `.csv`), the seed it was generated from and
/// the pool size it is replayed with.
pub struct Shipped {
    /// File stem under benches/traces/.
    pub name: &'static str,
    /// What it stands for.
    pub about: &'static str,
    /// Generator seed.
    pub seed: u64,
    /// maxWorkers (KEDA: maxReplicaCount) it runs with.
    pub max_workers: u32,
    /// The generator.
    pub generate: fn(&mut Rng) -> Vec<Ticket>,
}

/// The shipped traces.
pub const SHIPPED: &[Shipped] = &[
    Shipped {
        name: "steady",
        about: "steady Poisson arrivals, one ticket every 20 s on average for 4 h, runs of about 2 min",
        seed: 1,
        max_workers: 20,
        generate: steady,
    },
    Shipped {
        name: "pr-bursts",
        about: "pull requests every 12 min on average for 8 h, each publishing 20 to 60 tickets within 10 s",
        seed: 2,
        max_workers: 40,
        generate: pr_bursts,
    },
    Shipped {
        name: "nightly",
        about: "a nightly batch: 3,000 tickets published within one minute",
        seed: 3,
        max_workers: 100,
        generate: nightly,
    },
    Shipped {
        name: "diurnal",
        about: "24 h of a working day: a ticket every 10 min at night, up to 4 a minute at 13:00",
        seed: 4,
        max_workers: 30,
        generate: diurnal,
    },
    Shipped {
        name: "long-short",
        about: "6 h of short tickets (about 90 s) mixed with long ones of 20 min to 2 h, the last one at the end",
        seed: 5,
        max_workers: 20,
        generate: long_short,
    },
];

/// SplitMix64.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn between(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Exponential with mean `mean`.
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -mean * self.uniform().ln()
    }

    /// Log-normal with median `median` and shape `sigma`, clamped to [lo, hi].
    pub fn lognormal(&mut self, median: f64, sigma: f64, lo: f64, hi: f64) -> f64 {
        let normal = (-2.0 * self.uniform().ln()).sqrt() * (2.0 * PI * self.uniform()).cos();
        (median * (sigma * normal).exp()).clamp(lo, hi)
    }
}

fn ticket(arrival: f64, run: f64) -> Ticket {
    Ticket {
        arrival: (arrival * 10.0).round() / 10.0,
        run: run.round().max(1.0),
    }
}

fn sorted(mut tickets: Vec<Ticket>) -> Vec<Ticket> {
    tickets.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
    tickets
}

fn steady(rng: &mut Rng) -> Vec<Ticket> {
    let mut out = Vec::new();
    let mut t = rng.exponential(20.0);
    while t < 4.0 * 3600.0 {
        out.push(ticket(t, rng.lognormal(120.0, 0.6, 10.0, 1800.0)));
        t += rng.exponential(20.0);
    }
    out
}

fn pr_bursts(rng: &mut Rng) -> Vec<Ticket> {
    let mut out = Vec::new();
    let mut t = rng.exponential(720.0);
    while t < 8.0 * 3600.0 {
        let n = rng.between(20.0, 61.0) as usize;
        for _ in 0..n {
            let at = t + rng.between(0.0, 10.0);
            out.push(ticket(at, rng.lognormal(90.0, 0.5, 10.0, 900.0)));
        }
        t += rng.exponential(720.0);
    }
    sorted(out)
}

fn nightly(rng: &mut Rng) -> Vec<Ticket> {
    let out = (0..3000)
        .map(|_| {
            let at = rng.between(0.0, 60.0);
            ticket(at, rng.lognormal(60.0, 0.7, 5.0, 1200.0))
        })
        .collect();
    sorted(out)
}

fn diurnal(rng: &mut Rng) -> Vec<Ticket> {
    // Rate per second at hour h: 1/600 at night, up to 1/15 at 13:00 (thinning).
    let peak = 1.0 / 15.0;
    let rate = |t: f64| {
        let h = t / 3600.0;
        let day = if (8.0..18.0).contains(&h) {
            (PI * (h - 8.0) / 10.0).sin().powi(2)
        } else {
            0.0
        };
        1.0 / 600.0 + (peak - 1.0 / 600.0) * day
    };
    let mut out = Vec::new();
    let mut t = 0.0;
    loop {
        t += rng.exponential(1.0 / peak);
        if t >= 24.0 * 3600.0 {
            break;
        }
        if rng.uniform() < rate(t) / peak {
            out.push(ticket(t, rng.lognormal(180.0, 0.6, 10.0, 3600.0)));
        }
    }
    out
}

fn long_short(rng: &mut Rng) -> Vec<Ticket> {
    let end = 6.0 * 3600.0;
    let mut out = Vec::new();
    let mut t = rng.exponential(45.0);
    while t < end {
        out.push(ticket(t, rng.lognormal(90.0, 0.5, 10.0, 600.0)));
        t += rng.exponential(45.0);
    }
    let mut t = rng.exponential(1800.0);
    while t < end {
        out.push(ticket(t, rng.between(1200.0, 7200.0)));
        t += rng.exponential(1800.0);
    }
    // The last ticket of the night: a two-hour suite after the queue has emptied.
    out.push(ticket(end + 60.0, 7200.0));
    sorted(out)
}

/// Reads a trace: a header line `arrival_s,run_s`, then one ticket a line. Sorted by
/// arrival.
pub fn read(path: &Path) -> Result<Vec<Ticket>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = text.lines();
    match lines.next().map(str::trim) {
        Some("arrival_s,run_s") => {}
        other => {
            return Err(format!(
                "{}: the first line must be `arrival_s,run_s`, not {other:?}",
                path.display()
            ));
        }
    }
    let mut out = Vec::new();
    for (n, line) in lines.enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let parse = |s: Option<&str>| -> Result<f64, String> {
            let v: f64 = s
                .ok_or("two columns expected")?
                .trim()
                .parse()
                .map_err(|e| format!("{e}"))?;
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(format!("{v} is not a time"))
            }
        };
        let mut cols = line.split(',');
        let ticket = parse(cols.next())
            .and_then(|arrival| {
                Ok(Ticket {
                    arrival,
                    run: parse(cols.next())?,
                })
            })
            .map_err(|e| format!("{}:{}: {e}", path.display(), n + 2))?;
        out.push(ticket);
    }
    Ok(sorted(out))
}

/// Writes a trace as CSV.
pub fn write(path: &Path, tickets: &[Ticket]) -> std::io::Result<()> {
    let mut text = String::from("arrival_s,run_s\n");
    for t in tickets {
        text.push_str(&format!("{},{}\n", t.arrival, t.run));
    }
    std::fs::write(path, text)
}

/// Generates a shipped trace from its seed.
pub fn generate(shipped: &Shipped) -> Vec<Ticket> {
    (shipped.generate)(&mut Rng::new(shipped.seed))
}
