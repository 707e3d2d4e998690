//! The halt watch: the event-loop handler that asks the vCPUs whether the guest has
//! halted for good and ends the VM when [`judge`] says so (the steps are in
//! [`super::halt`]'s documentation).
#![forbid(unsafe_code)]

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::command::{Command, Reply};
use super::halt::{judge, HaltProbe, Live, Verdict};
use super::kvm_stats::StatAt;
use super::VcpuHandle;
use crate::event_loop::{self, EventHandler, LoopHandle, Ops};
use crate::outcome::{StopSignal, VmOutcome};

/// How often the watch looks.
pub const PERIOD: Duration = Duration::from_secs(1);
/// A round whose answers have not all come back after this many periods is abandoned
/// (its late answers are ignored) and a new one starts.
const ROUND_TIMEOUT_PERIODS: u32 = 5;
/// Rounds in a row that must find the guest halted when there are no KVM statistics
/// to show that no vCPU ran while the answers were gathered.
const CONFIRMATIONS_WITHOUT_STATS: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create or arm the halt watch's timer")]
    Timer(#[source] vmm_sys_util::errno::Error),
}

/// Where a vCPU's `blocking` and `exits` statistics are.
#[derive(Clone, Copy)]
struct StatsAt {
    blocking: StatAt,
    exits: StatAt,
}

/// What the statistics say before a round.
enum Look {
    /// Some vCPU is not blocked in KVM.
    Running,
    /// All are blocked; their `exits` counts.
    Blocked(Vec<u64>),
    /// No statistics: ask.
    Unknown,
}

/// One round's answers, handed back to the loop.
struct Round {
    id: u64,
    replies: Vec<Reply>,
    exits_before: Option<Vec<u64>>,
}

/// The event-loop handler that ends the VM once its guest has halted for good.
pub struct HaltWatch {
    timer: TimerFd,
    vcpus: Vec<VcpuHandle>,
    /// One per vCPU when every vCPU has both statistics.
    stats: Option<Vec<StatsAt>>,
    events: LoopHandle,
    stop: Arc<StopSignal>,
    /// The round being gathered: its id and when it started.
    in_flight: Option<(u64, Instant)>,
    next_round: u64,
    /// Rounds in a row that found the guest halted (without statistics).
    streak: u32,
    /// The last reason found for the guest being alive (logged when it changes).
    last_live: Option<Live>,
}

impl HaltWatch {
    pub fn new(
        vcpus: Vec<VcpuHandle>,
        events: LoopHandle,
        stop: Arc<StopSignal>,
    ) -> Result<Self, Error> {
        let mut timer = TimerFd::new().map_err(Error::Timer)?;
        timer.reset(PERIOD, Some(PERIOD)).map_err(Error::Timer)?;
        let stats = vcpus
            .iter()
            .map(|h| {
                let fd = h.kvm_stats.as_ref().as_ref().ok()?;
                Some(StatsAt {
                    blocking: fd.locate("blocking")?,
                    exits: fd.locate("exits")?,
                })
            })
            .collect::<Option<Vec<_>>>();
        if stats.is_none() {
            log::debug!(
                "halt watch: no KVM blocking/exits statistics; every vCPU is asked each {PERIOD:?}"
            );
        }
        Ok(Self {
            timer,
            vcpus,
            stats,
            events,
            stop,
            in_flight: None,
            next_round: 0,
            streak: 0,
            last_live: None,
        })
    }

    fn look(&self) -> Look {
        let Some(stats) = &self.stats else {
            return Look::Unknown;
        };
        let mut exits = Vec::with_capacity(stats.len());
        for (h, at) in self.vcpus.iter().zip(stats) {
            let Ok(fd) = h.kvm_stats.as_ref() else {
                return Look::Unknown;
            };
            match fd.read_value(at.blocking) {
                Ok(0) => return Look::Running,
                Ok(_) => {}
                Err(e) => {
                    log::debug!("halt watch: vCPU {}: {e}", h.index);
                    return Look::Unknown;
                }
            }
            match fd.read_value(at.exits) {
                Ok(v) => exits.push(v),
                Err(e) => {
                    log::debug!("halt watch: vCPU {}: {e}", h.index);
                    return Look::Unknown;
                }
            }
        }
        Look::Blocked(exits)
    }

    fn exits_now(&self) -> Option<Vec<u64>> {
        let stats = self.stats.as_ref()?;
        self.vcpus
            .iter()
            .zip(stats)
            .map(|(h, at)| {
                h.kvm_stats
                    .as_ref()
                    .as_ref()
                    .ok()?
                    .read_value(at.exits)
                    .ok()
            })
            .collect()
    }

    fn tick(&mut self, ops: &mut Ops<'_>) {
        if self.stop.is_stopping() {
            return;
        }
        if let Some((_, started)) = self.in_flight {
            if started.elapsed() < PERIOD * ROUND_TIMEOUT_PERIODS {
                return;
            }
            log::debug!("halt watch: a round got no full answer; starting another");
        }
        let exits_before = match self.look() {
            Look::Running => {
                self.streak = 0;
                return;
            }
            Look::Blocked(exits) => Some(exits),
            Look::Unknown => None,
        };
        let id = self.next_round;
        self.next_round += 1;
        self.in_flight = Some((id, Instant::now()));
        let handler = ops.id();
        let events = self.events.clone();
        super::broadcast(&self.vcpus, Command::HaltProbe, move |replies| {
            let round = Round {
                id,
                replies,
                exits_before,
            };
            // The loop is gone only when the VM is being torn down.
            let _ = events.call(move |ctx| {
                ctx.deliver(handler, Box::new(round));
            });
        });
    }

    fn conclude(&mut self, round: Round, ops: &mut Ops<'_>) {
        let started = match self.in_flight {
            Some((id, started)) if id == round.id => started,
            _ => return, // abandoned
        };
        self.in_flight = None;
        log::trace!(
            "halt watch: round {} answered in {:?}",
            round.id,
            started.elapsed()
        );
        let answers: Vec<Option<HaltProbe>> = round
            .replies
            .iter()
            .map(|r| match r {
                Reply::HaltProbe(p) => Some(*p),
                _ => None,
            })
            .collect();
        let exits_after = round.exits_before.as_ref().and_then(|_| self.exits_now());
        let exits = match (&round.exits_before, &exits_after) {
            (Some(b), Some(a)) => Some((b.as_slice(), a.as_slice())),
            _ => None,
        };
        match judge(&answers, exits) {
            Verdict::HaltedForGood => {
                self.streak += 1;
                if exits.is_none() && self.streak < CONFIRMATIONS_WITHOUT_STATS {
                    return;
                }
                log::info!(
                    "guest halted: all {} vCPU(s) stopped with interrupts disabled and nothing pending; ending the VM",
                    self.vcpus.len()
                );
                ops.stop_vm(VmOutcome::GuestHalted);
            }
            Verdict::Live(why) => {
                self.streak = 0;
                if self.last_live.as_ref() != Some(&why) {
                    log::debug!("halt watch: guest alive: {why}");
                    self.last_live = Some(why);
                }
            }
        }
    }
}

impl EventHandler for HaltWatch {
    fn name(&self) -> &str {
        "halt-watch"
    }

    fn init(&mut self, ops: &mut Ops<'_>) -> Result<(), event_loop::Error> {
        ops.add(&self.timer, 0, EventSet::IN)
    }

    fn handle(&mut self, _: u32, _: EventSet, ops: &mut Ops<'_>) {
        // Readable: the timer expired, so this read does not block.
        let _ = self.timer.wait();
        self.tick(ops);
    }

    fn on_message(&mut self, msg: Box<dyn Any + Send>, ops: &mut Ops<'_>) {
        match msg.downcast::<Round>() {
            Ok(round) => self.conclude(*round, ops),
            Err(_) => log::warn!("halt watch: unexpected message"),
        }
    }
}
