//! Which snapshots a retention policy keeps, with borg's documented prune semantics.
//!
//! Rules run in the order within, last, hourly, daily, weekly, monthly, yearly. Each rule walks
//! the snapshots newest first; the first snapshot of each period (in the local time zone given)
//! is kept unless an earlier rule kept it already. A snapshot kept by an earlier rule still
//! takes up its period but does not count towards the later rule's number. When a rule finds
//! fewer periods than its number, it keeps the oldest snapshot too ("oldest"). `keep-within`
//! keeps everything newer than `now - interval`. A count of -1 means "no limit".

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};

/// How many of each kind to keep.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Keep everything newer than this many seconds before now.
    pub within_secs: Option<i64>,
    /// Keep the last N (one per second, as borg's keep-last).
    pub last: i32,
    /// Keep the last N hours' newest.
    pub hourly: i32,
    /// Keep the last N days' newest.
    pub daily: i32,
    /// Keep the last N ISO weeks' newest.
    pub weekly: i32,
    /// Keep the last N months' newest.
    pub monthly: i32,
    /// Keep the last N years' newest.
    pub yearly: i32,
}

impl Policy {
    /// Whether no rule is set (prune refuses such a policy rather than remove everything).
    pub fn is_empty(&self) -> bool {
        self.within_secs.is_none()
            && [self.last, self.hourly, self.daily, self.weekly, self.monthly, self.yearly].iter().all(|&n| n == 0)
    }
}

/// Parse borg's interval syntax: a positive integer and one of H, d, w, m (31 days), y (365 days).
pub fn parse_within(s: &str) -> Result<i64, String> {
    let unit_at = s.char_indices().last().map(|(i, _)| i).unwrap_or(0);
    let (num, unit) = s.split_at(unit_at);
    let n: i64 = num.parse().map_err(|_| format!("{s:?}: expected a number and a unit, like 7d"))?;
    if n <= 0 {
        return Err(format!("{s:?}: the number must be positive"));
    }
    let hours = match unit {
        "H" => 1,
        "d" => 24,
        "w" => 24 * 7,
        "m" => 24 * 31,
        "y" => 24 * 365,
        _ => return Err(format!("{s:?}: unit must be H, d, w, m or y")),
    };
    n.checked_mul(hours * 3600)
        .filter(|&secs| secs <= 1000 * 366 * 24 * 3600)
        .ok_or_else(|| format!("{s:?}: longer than 1000 years"))
}

/// Why a snapshot is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reason {
    /// Rule name: within, last, hourly, daily, weekly, monthly, yearly; "[oldest]" appended when
    /// kept as the oldest of a rule that did not fill its number.
    pub rule: String,
    /// Position within that rule (1 = newest it kept).
    pub n: usize,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} #{}", self.rule, self.n)
    }
}

type Period = (i32, u32, u32, u32, u32);

/// A rule: its name, its count, and the period a local time falls in.
type Rule<Tz> = (&'static str, i32, fn(&DateTime<Tz>) -> Period);

/// For each snapshot (same order as `times`), the reason it is kept, or `None` if it goes.
pub fn plan<Tz: TimeZone>(
    times: &[DateTime<Utc>],
    policy: &Policy,
    now: DateTime<Utc>,
    tz: &Tz,
) -> Vec<Option<Reason>> {
    let mut kept: Vec<Option<Reason>> = vec![None; times.len()];
    // Newest first; ties keep input order.
    let mut order: Vec<usize> = (0..times.len()).collect();
    order.sort_by(|&a, &b| times[b].cmp(&times[a]));

    if let Some(secs) = policy.within_secs {
        let limit = chrono::Duration::try_seconds(secs)
            .and_then(|d| now.checked_sub_signed(d))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let mut n = 0;
        for &i in &order {
            if times[i] > limit {
                n += 1;
                kept[i] = Some(Reason { rule: "within".into(), n });
            }
        }
    }

    let rules: [Rule<Tz>; 6] = [
        ("last", policy.last, |t| (t.year(), t.ordinal(), t.hour(), t.minute(), t.second())),
        ("hourly", policy.hourly, |t| (t.year(), t.ordinal(), t.hour(), 0, 0)),
        ("daily", policy.daily, |t| (t.year(), t.ordinal(), 0, 0, 0)),
        ("weekly", policy.weekly, |t| {
            let w = t.iso_week();
            (w.year(), w.week(), 0, 0, 0)
        }),
        ("monthly", policy.monthly, |t| (t.year(), t.month(), 0, 0, 0)),
        ("yearly", policy.yearly, |t| (t.year(), 0, 0, 0, 0)),
    ];
    for (name, n, period_of) in rules {
        if n == 0 {
            continue;
        }
        let mut last: Option<Period> = None;
        let mut count = 0usize;
        let mut finished = false;
        for &i in &order {
            let period = period_of(&times[i].with_timezone(tz));
            if last != Some(period) {
                last = Some(period);
                if kept[i].is_none() {
                    count += 1;
                    kept[i] = Some(Reason { rule: name.into(), n: count });
                    if n > 0 && count == n as usize {
                        finished = true;
                        break;
                    }
                }
            }
        }
        // Keep the oldest when the rule found fewer periods than asked for.
        if !finished
            && n > 0
            && let Some(&oldest) = order.last()
            && kept[oldest].is_none()
        {
            count += 1;
            kept[oldest] = Some(Reason { rule: format!("{name}[oldest]"), n: count });
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::Europe::Berlin;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    /// Runs `policy` over `times` and returns, for each, "rule #n" or "removed".
    fn run(times: &[&str], policy: Policy, now: &str) -> Vec<String> {
        let t: Vec<_> = times.iter().map(|s| at(s)).collect();
        plan(&t, &policy, at(now), &Berlin)
            .into_iter()
            .map(|r| r.map(|r| r.to_string()).unwrap_or_else(|| "removed".into()))
            .collect()
    }

    #[test]
    fn daily_keeps_newest_of_each_day_and_oldest_when_short() {
        let times = [
            "2026-03-01T10:00:00Z",
            "2026-03-02T09:00:00Z",
            "2026-03-02T21:00:00Z",
            "2026-03-04T08:00:00Z", // a gap on the 3rd
        ];
        let p = Policy { daily: 3, ..Default::default() };
        assert_eq!(run(&times, p, "2026-03-05T00:00:00Z"), ["daily #3", "removed", "daily #2", "daily #1"]);
        let p = Policy { daily: 5, ..Default::default() };
        // Only 3 days have snapshots: the oldest is kept as well, once.
        assert_eq!(run(&times, p, "2026-03-05T00:00:00Z"), ["daily #3", "removed", "daily #2", "daily #1"]);
        let times2 = ["2026-03-01T10:00:00Z", "2026-03-01T11:00:00Z", "2026-03-02T09:00:00Z"];
        let p = Policy { daily: 5, ..Default::default() };
        assert_eq!(run(&times2, p, "2026-03-05T00:00:00Z"), ["daily[oldest] #3", "daily #2", "daily #1"]);
    }

    #[test]
    fn days_follow_local_time_across_dst() {
        // Berlin switched to summer time on 2026-03-29 at 02:00 CET (01:00 UTC).
        // 22:30 UTC on the 28th is 23:30 CET (the 28th); 22:30 UTC on the 29th is 00:30 CEST (the 30th).
        let times = [
            "2026-03-28T22:30:00Z", // local 2026-03-28 23:30
            "2026-03-28T23:30:00Z", // local 2026-03-29 00:30
            "2026-03-29T21:30:00Z", // local 2026-03-29 23:30
            "2026-03-29T22:30:00Z", // local 2026-03-30 00:30
        ];
        let p = Policy { daily: 10, ..Default::default() };
        assert_eq!(run(&times, p, "2026-04-01T00:00:00Z"), ["daily #3", "removed", "daily #2", "daily #1"]);
        // Autumn: 2026-10-25 03:00 CEST goes back to 02:00 CET; the repeated hour is one day.
        let times = ["2026-10-25T00:30:00Z", "2026-10-25T01:30:00Z", "2026-10-25T22:59:00Z", "2026-10-25T23:01:00Z"];
        let p = Policy { daily: 10, hourly: 0, ..Default::default() };
        assert_eq!(run(&times, p, "2026-11-01T00:00:00Z"), ["daily[oldest] #3", "removed", "daily #2", "daily #1"]);
        // Hourly: 00:30Z is 02:30 CEST, 01:30Z is 02:30 CET: the same local hour label, but
        // they are neighbours in time, so borg's "period changed" test counts them once.
        let times = ["2026-10-25T00:30:00Z", "2026-10-25T01:30:00Z"];
        let p = Policy { hourly: 10, ..Default::default() };
        assert_eq!(run(&times, p, "2026-11-01T00:00:00Z"), ["hourly[oldest] #2", "hourly #1"]);
    }

    #[test]
    fn weekly_uses_iso_weeks_and_month_ends() {
        let times = [
            "2026-12-27T12:00:00Z", // Sunday, ISO week 2026-52
            "2026-12-28T12:00:00Z", // Monday, ISO week 2026-53
            "2027-01-03T12:00:00Z", // Sunday, still ISO week 2026-53
            "2027-01-04T12:00:00Z", // Monday, ISO week 2027-01
        ];
        let p = Policy { weekly: 3, ..Default::default() };
        assert_eq!(run(&times, p, "2027-01-05T00:00:00Z"), ["weekly #3", "removed", "weekly #2", "weekly #1"]);
        // Month ends: the newest of each month, in local time (23:30Z on Jan 31 is Feb 1 in Berlin).
        let times = ["2026-01-30T12:00:00Z", "2026-01-31T23:30:00Z", "2026-02-28T12:00:00Z", "2026-03-31T21:00:00Z"];
        let p = Policy { monthly: 2, ..Default::default() };
        assert_eq!(run(&times, p, "2026-04-05T00:00:00Z"), ["removed", "removed", "monthly #2", "monthly #1"]);
        let p = Policy { monthly: 3, ..Default::default() };
        assert_eq!(run(&times, p, "2026-04-05T00:00:00Z"), ["monthly #3", "removed", "monthly #2", "monthly #1"]);
    }

    #[test]
    fn rules_share_periods_and_do_not_double_count() {
        // Daily 7 weekly 4 monthly 6 over 90 days of 1 snapshot/day at noon UTC.
        let times: Vec<String> =
            (0..90).map(|d| (at("2026-01-01T12:00:00Z") + chrono::Duration::days(d)).to_rfc3339()).collect();
        let refs: Vec<&str> = times.iter().map(String::as_str).collect();
        let p = Policy { daily: 7, weekly: 4, monthly: 6, ..Default::default() };
        let r = run(&refs, p, "2026-04-01T00:00:00Z");
        let kept: Vec<(usize, &String)> = r.iter().enumerate().filter(|(_, s)| *s != "removed").collect();
        // 7 dailies (Mar 25..31), then 4 weeklies on Sundays before them (Mar 22, 15, 8, 1),
        // then monthlies: March's newest is kept already (daily) so it counts no month; Feb 28,
        // Jan 31, and then the oldest (Jan 1) because only 2 more months exist.
        let expect = [
            (0, "monthly[oldest] #3"),
            (30, "monthly #2"),
            (58, "monthly #1"),
            (59, "weekly #4"),
            (66, "weekly #3"),
            (73, "weekly #2"),
            (80, "weekly #1"),
            (83, "daily #7"),
            (84, "daily #6"),
            (85, "daily #5"),
            (86, "daily #4"),
            (87, "daily #3"),
            (88, "daily #2"),
            (89, "daily #1"),
        ];
        let got: Vec<(usize, &str)> = kept.iter().map(|(i, s)| (*i, s.as_str())).collect();
        assert_eq!(got, expect);
    }

    #[test]
    fn within_last_and_unlimited() {
        let times = ["2026-05-01T00:00:00Z", "2026-05-02T00:00:00Z", "2026-05-03T00:00:00Z", "2026-05-03T00:00:01Z"];
        let p = Policy { within_secs: Some(parse_within("2d").unwrap()), ..Default::default() };
        // Strictly newer than now - 48h = 2026-05-02T00:00:00Z.
        assert_eq!(run(&times, p, "2026-05-04T00:00:00Z"), ["removed", "removed", "within #2", "within #1"]);
        let p = Policy { last: 2, ..Default::default() };
        assert_eq!(run(&times, p, "2026-05-04T00:00:00Z"), ["removed", "removed", "last #2", "last #1"]);
        let p = Policy { daily: -1, ..Default::default() };
        assert_eq!(run(&times, p, "2026-05-04T00:00:00Z"), ["daily #3", "daily #2", "removed", "daily #1"]);
        assert_eq!(parse_within("1m").unwrap(), 31 * 24 * 3600);
        assert!(parse_within("0d").is_err() && parse_within("5x").is_err() && parse_within("d").is_err());
        assert!(parse_within("5é").is_err() && parse_within("99999999999999y").is_err());
    }
}
