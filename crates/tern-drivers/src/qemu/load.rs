//! tern's Linux guest workload (`guest/tern-load.c`) as the host sees it:
//! its parameters (kernel command-line words) and its console report.
//!
//! The guest rewrites a working set round-robin and, every few ticks, checks
//! every page and prints a checksum of the whole set. Page contents are a pure
//! function of (page, tick that last wrote it), so the checksum is a pure
//! function of the tick: [`LoadParams::expected_sum`] computes it here, the
//! same way, and a migration is correct when the guest's counter continues on
//! the target and its reported sums match.

/// The workload's parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadParams {
    /// Working set, MiB.
    pub ws_mib: u64,
    /// MiB written per second.
    pub dirty_mib: u64,
    /// Milliseconds per tick.
    pub tick_ms: u64,
    /// Ticks between full checks (0: never).
    pub verify_every: u64,
}

impl Default for LoadParams {
    fn default() -> Self {
        Self {
            ws_mib: 16,
            dirty_mib: 8,
            tick_ms: 100,
            verify_every: 10,
        }
    }
}

const PAGE: u64 = tern_vmm::memory::PAGE_SIZE;
const WORDS: u64 = PAGE / 8;

/// Word `w` of page `p` as written at tick `t` (splitmix64).
fn pattern(p: u64, t: u64, w: u64) -> u64 {
    let mut z = (p << 40) ^ (t << 12) ^ w;
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl LoadParams {
    /// The kernel command-line words that set these parameters.
    pub fn cmdline(&self) -> String {
        format!(
            "tern_load=1 tern_ws_mib={} tern_dirty_mib={} tern_tick_ms={} tern_verify_every={}",
            self.ws_mib, self.dirty_mib, self.tick_ms, self.verify_every
        )
    }

    fn pages(&self) -> u64 {
        (self.ws_mib.max(1) << 20) / PAGE
    }

    /// Pages the guest writes per tick (as the guest computes it).
    pub fn pages_per_tick(&self) -> u64 {
        let tick_ms = if self.tick_ms == 0 { 100 } else { self.tick_ms };
        ((self.dirty_mib << 20) / PAGE * tick_ms / 1000).clamp(1, self.pages())
    }

    fn last_tick(&self, p: u64, tick: u64) -> u64 {
        let (per, n) = (self.pages_per_tick(), self.pages());
        let writes = tick * per;
        if writes <= p {
            return 0;
        }
        let g = p + ((writes - 1 - p) / n) * n;
        g / per + 1
    }

    /// The checksum an intact guest reports at `tick`.
    pub fn expected_sum(&self, tick: u64) -> u64 {
        let mut sum = 0u64;
        for p in 0..self.pages() {
            let t = self.last_tick(p, tick);
            for w in 0..WORDS {
                sum = (sum ^ pattern(p, t, w)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        sum
    }
}

/// One line of the workload's console report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadLine {
    /// The workload started.
    Ready,
    /// A tick without a check.
    Tick(u64),
    /// A tick with a full check: the guest's checksum and whether every page
    /// held what it must.
    Checked {
        /// The tick.
        tick: u64,
        /// The guest's checksum of its working set.
        sum: u64,
        /// Every page matched.
        ok: bool,
    },
    /// The workload could not start.
    Failed,
}

/// Parses one console line (`None` for anything else the guest prints).
pub fn parse_line(line: &str) -> Option<LoadLine> {
    let rest = line.trim().strip_prefix("tern-load ")?;
    if rest.starts_with("ready") {
        return Some(LoadLine::Ready);
    }
    if rest.starts_with("failed") {
        return Some(LoadLine::Failed);
    }
    let mut tick = None;
    let mut sum = None;
    let mut ok = None;
    for kv in rest.split_whitespace() {
        match kv.split_once('=')? {
            ("tick", v) => tick = v.parse().ok(),
            ("sum", v) => sum = u64::from_str_radix(v, 16).ok(),
            ("ok", v) => ok = Some(v == "1"),
            _ => {}
        }
    }
    match (tick?, sum, ok) {
        (tick, Some(sum), Some(ok)) => Some(LoadLine::Checked { tick, sum, ok }),
        (tick, None, None) => Some(LoadLine::Tick(tick)),
        _ => None,
    }
}

/// What a console log says about the workload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// The workload printed its ready line.
    pub ready: bool,
    /// The first tick printed.
    pub first_tick: Option<u64>,
    /// The last tick printed.
    pub last_tick: Option<u64>,
    /// Checks whose page check failed or whose sum differs from the expected.
    pub bad_checks: Vec<u64>,
    /// Checks that passed.
    pub good_checks: u64,
    /// Ticks that went backwards or skipped (a restarted or corrupted guest).
    pub gaps: Vec<(u64, u64)>,
}

impl LoadReport {
    /// Reads a whole console log, verifying every check against `params`.
    pub fn from_console(text: &str, params: &LoadParams) -> LoadReport {
        let mut r = LoadReport::default();
        for line in text.lines() {
            let Some(l) = parse_line(line) else { continue };
            let tick = match l {
                LoadLine::Ready => {
                    r.ready = true;
                    continue;
                }
                LoadLine::Failed => continue,
                LoadLine::Tick(t) => t,
                LoadLine::Checked { tick, sum, ok } => {
                    if ok && sum == params.expected_sum(tick) {
                        r.good_checks += 1;
                    } else {
                        r.bad_checks.push(tick);
                    }
                    tick
                }
            };
            if let Some(last) = r.last_tick {
                if tick != last + 1 {
                    r.gaps.push((last, tick));
                }
            }
            r.first_tick.get_or_insert(tick);
            r.last_tick = Some(tick);
        }
        r
    }
}

/// The last tick the guest printed on a whole line of `console` (a line
/// still being printed may be cut short: `tick=1` of `tick=130`).
pub fn last_complete_tick(console: &str) -> u64 {
    workload_tick(console).unwrap_or(0)
}

/// The last tick tern's workload printed, if the guest runs it (`Some(0)`
/// once it said it is ready); `None` for a guest that reports nothing.
pub fn workload_tick(console: &str) -> Option<u64> {
    let whole = console.rfind('\n').map_or("", |i| &console[..i]);
    whole
        .lines()
        .rev()
        .filter_map(parse_line)
        .find_map(|l| match l {
            LoadLine::Tick(t) | LoadLine::Checked { tick: t, .. } => Some(t),
            LoadLine::Ready => Some(0),
            LoadLine::Failed => None,
        })
}

/// The guest's own verdict on what it printed since it resumed after a
/// migration (`fresh`), given the last tick it printed before: `None` until
/// it has printed a check; then whether its counter continued and its
/// checksum is the expected one, and what was seen.
pub fn verify_after_switchover(
    fresh: &str,
    source_last: u64,
    load: &LoadParams,
) -> Option<(bool, String)> {
    let mut first = None;
    let mut prev: Option<u64> = None;
    // The first line may be the tail of one the source began, or bytes the
    // serial port sends again after switchover (its FIFO migrates): only
    // lines that began here count.
    let (_, fresh) = fresh.split_once('\n')?;
    for line in fresh.lines() {
        let Some(l) = parse_line(line) else { continue };
        let (tick, check) = match l {
            LoadLine::Tick(t) => (t, None),
            LoadLine::Checked { tick, sum, ok } => (tick, Some((sum, ok))),
            LoadLine::Ready => {
                return Some((
                    false,
                    "the guest rebooted (ready line after switchover)".into(),
                ))
            }
            LoadLine::Failed => return Some((false, "the workload failed".into())),
        };
        if first.is_none() && tick <= source_last {
            // Output the source already printed, sent again by the serial
            // port's migrated FIFO: not new progress, not a failure. (A
            // restarted guest prints its ready line first.)
            continue;
        }
        if first.is_none() {
            first = Some(tick);
            // The line cut by switchover is skipped: allow two missing ticks.
            if tick > source_last + 3 {
                return Some((
                    false,
                    format!("the counter did not continue: source ended at {source_last}, target began at {tick}"),
                ));
            }
        }
        if let Some(p) = prev {
            if tick != p + 1 {
                return Some((false, format!("the counter jumped from {p} to {tick}")));
            }
        }
        prev = Some(tick);
        if let Some((sum, ok)) = check {
            let want = load.expected_sum(tick);
            return Some(if ok && sum == want {
                (
                    true,
                    format!(
                        "counter continued ({source_last} -> {}), checksum at tick {tick} matches",
                        first.unwrap_or(tick)
                    ),
                )
            } else {
                (
                    false,
                    format!("working set corrupted: at tick {tick} the guest's check said ok={ok}, sum {sum:016x}, expected {want:016x}"),
                )
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_and_anything_else_is_ignored() {
        assert_eq!(
            parse_line("tern-load ready ws_mib=16"),
            Some(LoadLine::Ready)
        );
        assert_eq!(parse_line("tern-load tick=7\r"), Some(LoadLine::Tick(7)));
        assert_eq!(
            parse_line("tern-load tick=10 sum=00000000000000ff ok=1"),
            Some(LoadLine::Checked {
                tick: 10,
                sum: 255,
                ok: true
            })
        );
        assert_eq!(parse_line("[    1.0] random kernel line"), None);
        assert_eq!(parse_line("tern-load tick=x"), None);
        assert_eq!(parse_line("tern-load tick=3 sum=zz ok=1"), None);
    }

    #[test]
    fn expected_sum_matches_the_guest_binary() {
        // Figure printed by guest/tern-load.c (16 MiB, 16 MiB/s, 100 ms
        // ticks) at tick 170 under QEMU.
        let p = LoadParams {
            ws_mib: 16,
            dirty_mib: 16,
            tick_ms: 100,
            verify_every: 10,
        };
        assert_eq!(p.expected_sum(170), 0xd41d38f5ade790e5);
    }

    #[test]
    fn a_report_finds_gaps_and_bad_checks() {
        let p = LoadParams {
            ws_mib: 1,
            ..Default::default()
        };
        let good = p.expected_sum(2);
        let text = format!(
            "noise\ntern-load ready\ntern-load tick=1\ntern-load tick=2 sum={good:016x} ok=1\n\
             tern-load tick=4 sum={good:016x} ok=1\n"
        );
        let r = LoadReport::from_console(&text, &p);
        assert!(r.ready);
        assert_eq!((r.first_tick, r.last_tick), (Some(1), Some(4)));
        assert_eq!(r.good_checks, 1);
        assert_eq!(r.bad_checks, vec![4]);
        assert_eq!(r.gaps, vec![(2, 4)]);
    }

    #[test]
    fn the_verdict_needs_continuity_and_the_right_sum() {
        let load = LoadParams {
            ws_mib: 1,
            dirty_mib: 1,
            tick_ms: 100,
            verify_every: 2,
        };
        let good = load.expected_sum(12);
        let ok = format!("ick=10\ntern-load tick=11\ntern-load tick=12 sum={good:016x} ok=1\n");
        assert!(verify_after_switchover(&ok, 10, &load).unwrap().0);
        assert_eq!(
            verify_after_switchover("\ntern-load tick=11\n", 10, &load),
            None
        );
        // The first line (cut or sent again at switchover) does not count.
        let replayed = format!("tern-load tick=1\n{}", &ok[7..]);
        assert!(verify_after_switchover(&replayed, 10, &load).unwrap().0);
        assert!(
            !verify_after_switchover(&ok, 5, &load).unwrap().0,
            "a gap after the source's last tick"
        );
        let again = format!("\ntern-load tick=1\n{}", &ok[7..]);
        assert!(
            verify_after_switchover(&again, 10, &load).unwrap().0,
            "old output sent again"
        );
        let bad = format!(
            "\ntern-load tick=11\ntern-load tick=12 sum={:016x} ok=1\n",
            good ^ 1
        );
        assert!(!verify_after_switchover(&bad, 10, &load).unwrap().0);
        let flagged = format!("\ntern-load tick=11\ntern-load tick=12 sum={good:016x} ok=0\n");
        assert!(!verify_after_switchover(&flagged, 10, &load).unwrap().0);
        assert!(
            !verify_after_switchover("\ntern-load ready\n", 10, &load)
                .unwrap()
                .0
        );
    }

    #[test]
    fn only_whole_lines_count_as_the_last_tick() {
        assert_eq!(
            last_complete_tick("tern-load tick=129\ntern-load tick=1"),
            129
        );
        assert_eq!(last_complete_tick("tern-load tick=129\n"), 129);
        assert_eq!(last_complete_tick("tern-load tick=1"), 0);
    }
}
