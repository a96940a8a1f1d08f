//! Each stream's writer, the control reader and the adaptive rate.

use super::*;

pub(super) enum WriteEnd {
    Done,
    Failed,
    ConnectionLost,
}

pub(super) async fn write_loop(
    sh: &Arc<SenderShared>,
    index: u16,
    generation: u64,
    w: BoxWrite,
    dead: &mut mpsc::Receiver<()>,
) -> WriteEnd {
    let mut sw = StreamWriter {
        sh,
        index,
        generation,
        w: BufWriter::with_capacity(256 * 1024, w),
        dead,
        finish_sent: false,
        next_ping: Instant::now() + HEARTBEAT,
        pings: 0,
        // TLS authenticates every byte; plaintext streams carry a checksum.
        checksummed: matches!(sh.security, Security::InsecurePlaintext),
    };
    loop {
        let seq = match sw.next_seq().await {
            Ok(Some(seq)) => seq,
            Ok(None) => continue,
            Err(end) => return end,
        };
        let Some(payload) = sw.claim(seq) else {
            continue;
        };
        if let Err(end) = sw.write_frame(seq, payload).await {
            return end;
        }
        if let Ok(()) = sw.dead.try_recv() {
            return WriteEnd::ConnectionLost;
        }
    }
}

/// One stream's writing end for one connection (`generation`).
struct StreamWriter<'a> {
    sh: &'a Arc<SenderShared>,
    index: u16,
    generation: u64,
    w: BufWriter<BoxWrite>,
    /// Fires when the control reader saw the connection die.
    dead: &'a mut mpsc::Receiver<()>,
    finish_sent: bool,
    checksummed: bool,
    /// When the next heartbeat is due (sent busy or idle: the receiver's
    /// answers are what tell this end the connection still works).
    next_ping: Instant,
    pings: u64,
}

impl StreamWriter<'_> {
    /// The next frame to write: replays first, then new frames; flushes
    /// (and announces the end once asked) before waiting. `None`: woken
    /// with nothing to write.
    async fn next_seq(&mut self) -> Result<Option<u64>, WriteEnd> {
        let sh = self.sh;
        if let Ok(s) = sh.replay.1.try_recv().or_else(|_| sh.queue.1.try_recv()) {
            return Ok(Some(s));
        }
        self.flush().await?;
        // Every stream announces the end, so it arrives whichever streams survive.
        let finish = { sh.state.lock().expect("send state").finish };
        if let (Some(total), false) = (finish, self.finish_sent) {
            let ok = self.w.write_all(&wire::finish_header(total)).await.is_ok()
                && self.w.flush().await.is_ok();
            if !ok {
                return Err(WriteEnd::ConnectionLost);
            }
            self.finish_sent = true;
        }
        let progress = sh.progress.notified();
        let beat = tokio::time::Instant::from_std(self.next_ping);
        tokio::select! {
            biased;
            _ = self.dead.recv() => Err(WriteEnd::ConnectionLost),
            s = sh.replay.1.recv() => s.map(Some).map_err(|_| end_state(sh)),
            s = sh.queue.1.recv() => s.map(Some).map_err(|_| end_state(sh)),
            _ = progress => Ok(None),
            _ = tokio::time::sleep_until(beat) => self.ping().await.map(|()| None),
        }
    }

    /// Writes a heartbeat if one is due (flushed with what follows, or
    /// before the writer next waits).
    async fn ping_if_due(&mut self) -> Result<(), WriteEnd> {
        if Instant::now() < self.next_ping {
            return Ok(());
        }
        self.pings += 1;
        self.next_ping = Instant::now() + HEARTBEAT;
        let header = wire::ping_header(self.pings);
        let ok = tokio::select! {
            r = self.w.write_all(&header) => r.is_ok(),
            _ = self.dead.recv() => false,
        };
        ok.then_some(()).ok_or(WriteEnd::ConnectionLost)
    }

    /// Writes a heartbeat now and flushes it.
    async fn ping(&mut self) -> Result<(), WriteEnd> {
        self.next_ping = Instant::now();
        self.ping_if_due().await?;
        self.flush().await
    }

    /// Sleeps `wait` (a rate limit), sending heartbeats meanwhile.
    async fn sleep_beating(&mut self, wait: Duration) -> Result<(), WriteEnd> {
        let until = Instant::now() + wait;
        loop {
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            if now >= self.next_ping {
                self.ping().await?;
            }
            tokio::time::sleep(until.min(self.next_ping) - now).await;
        }
    }

    /// Flushes what is buffered, unless the connection dies first.
    async fn flush(&mut self) -> Result<(), WriteEnd> {
        let flushed = tokio::select! {
            r = self.w.flush() => r.is_ok(),
            _ = self.dead.recv() => false,
        };
        flushed.then_some(()).ok_or(WriteEnd::ConnectionLost)
    }

    /// Marks `seq` as sent on this stream and returns its payload; `None`
    /// when it needs no sending (acknowledged, or received and only its
    /// ack outstanding).
    fn claim(&self, seq: u64) -> Option<Bytes> {
        let sh = self.sh;
        let mut st = sh.state.lock().expect("send state");
        if seq < st.acked_upto {
            return None;
        }
        let p = st.unacked.get_mut(&seq)?;
        if p.received && p.times_sent > 0 {
            return None;
        }
        p.sent_on = Some((self.index, self.generation));
        p.times_sent += 1;
        if p.times_sent > 1 {
            sh.counters.retransmits.fetch_add(1, Relaxed);
            sh.counters
                .retransmitted_bytes
                .fetch_add(p.payload.len() as u64, Relaxed);
        }
        Some(p.payload.clone())
    }

    /// Waits for the rate limits, then writes one frame.
    async fn write_frame(&mut self, seq: u64, payload: Bytes) -> Result<(), WriteEnd> {
        let sh = self.sh;
        let wire_len = payload.len() + wire::frame_overhead(self.checksummed);
        let mut wait = sh.bucket.reserve(wire_len);
        if let Some(h) = &sh.host {
            wait = wait.max(h.reserve(wire_len));
        }
        if !wait.is_zero() {
            // Rate-limited: push out what is buffered before sleeping, or it
            // would sit in the buffer and look like network delay.
            self.flush().await?;
            self.sleep_beating(wait).await?;
        }
        self.ping_if_due().await?;
        let w = &mut self.w;
        let checksummed = self.checksummed;
        let ok = async {
            w.write_all(&wire::data_header(seq, payload.len() as u32))
                .await?;
            w.write_all(&payload).await?;
            if checksummed {
                w.write_all(&wire::payload_hash(&payload)).await?;
            }
            Ok::<(), std::io::Error>(())
        };
        // A write can block on a connection whose peer is gone; the control
        // reader notices first, so race the two.
        let wrote = tokio::select! {
            r = ok => r.is_ok(),
            _ = self.dead.recv() => false,
        };
        if !wrote {
            return Err(WriteEnd::ConnectionLost);
        }
        // Sent time is when the bytes left us, not when they were queued.
        if let Some(p) = sh.state.lock().expect("send state").unacked.get_mut(&seq) {
            p.sent_at = Some(Instant::now());
        }
        sh.counters.frames_sent.fetch_add(1, Relaxed);
        sh.counters.bytes_sent.fetch_add(wire_len as u64, Relaxed);
        Ok(())
    }
}

pub(super) fn end_state(sh: &SenderShared) -> WriteEnd {
    if sh.failure().is_some() {
        WriteEnd::Failed
    } else {
        WriteEnd::Done
    }
}

pub(super) async fn control_reader(sh: Arc<SenderShared>, mut r: BoxRead, dead: mpsc::Sender<()>) {
    let mut b = [0u8; CONTROL_LEN];
    loop {
        // The receiver answers every heartbeat: silence means the link or
        // the peer is gone, even if TCP has not noticed.
        let read = tokio::time::timeout(SILENCE_LIMIT, r.read_exact(&mut b)).await;
        if !matches!(read, Ok(Ok(_))) {
            if read.is_err() {
                tracing::info!("migration stream silent for {SILENCE_LIMIT:?}; dropping it");
            }
            let _ = dead.try_send(());
            return;
        }
        match Control::decode(&b) {
            Ok(Control::Ack(upto)) => sh.on_ack(upto),
            Ok(Control::Pong(_)) => {}
            Ok(Control::Nack(seq)) => {
                sh.counters.nacks.fetch_add(1, Relaxed);
                let _ = sh.replay.0.try_send(seq);
            }
            Ok(Control::FinishAck(total)) => {
                let mut st = sh.state.lock().expect("send state");
                if st.finish == Some(total) {
                    st.finish_confirmed = true;
                }
                drop(st);
                sh.progress.notify_waiters();
            }
            Err(e) => {
                tracing::warn!(error = %e, "bad control message; dropping stream");
                let _ = dead.try_send(());
                return;
            }
        }
    }
}

/// Adapts the session rate: back off to what is delivered when the RTT shows a
/// queue building or throughput stalls; probe upwards while the path is clear.
pub(super) async fn rate_task(sh: std::sync::Weak<SenderShared>) {
    const TICK: Duration = Duration::from_millis(100);
    // Bytes the judged window must be long enough to carry at the current
    // rate (with 5 ticks, 0.5 s, at least, and 5 s at most). Acks come a
    // frame at a time: with 1 MiB page frames at a few MB/s, 5 ticks held
    // one or two frames, a window that saw one read as a stall, each
    // back-off lowered the rate and the next window held fewer: measured,
    // a native migration settled at 2.5 MB/s on a 25 MB/s, 20 ms link.
    const JUDGED_BYTES: f64 = 8.0 * 1024.0 * 1024.0;
    let mut last_acked = 0u64;
    let mut last = Instant::now();
    let mut hold_until = Instant::now();
    // (seconds, bytes delivered, limiter rate) per tick, over the judged
    // window: one tick holds too few frames at low rates to judge by.
    let mut history: std::collections::VecDeque<(f64, f64, f64)> = Default::default();
    // Slow start: until the first sign of congestion the rate doubles each
    // tick, as TCP's does, instead of growing 10 %. From the 8 MiB/s start a
    // 25 MB/s link took 1.2 s to fill at 10 % a tick (a QEMU relay over 20 ms
    // and 200 Mbit/s averaged 64 % of the link); doubling fills it in 2 ticks.
    let mut slow_start = true;
    loop {
        tokio::time::sleep(TICK).await;
        let Some(sh) = sh.upgrade() else { return };
        if sh.failure().is_some() {
            return;
        }
        let ceiling = sh.ceiling();
        let acked = sh.counters.bytes_acked.load(Relaxed);
        let dt = last.elapsed().as_secs_f64();
        history.push_back((dt, (acked - last_acked) as f64, sh.bucket.rate() as f64));
        let need = (JUDGED_BYTES / sh.bucket.rate().max(1) as f64).clamp(0.5, 5.0);
        while history.len() > 5 && history.iter().skip(1).map(|h| h.0).sum::<f64>() >= need {
            history.pop_front();
        }
        last_acked = acked;
        last = Instant::now();
        let span: f64 = history.iter().map(|h| h.0).sum();
        let delivered = history.iter().map(|h| h.1).sum::<f64>() / span;
        let mean_rate = history.iter().map(|h| h.2 * h.0).sum::<f64>() / span;
        sh.adapt_to_link();
        if !sh.adaptive.load(Relaxed) {
            if sh.bucket.rate() != ceiling {
                sh.bucket.set_rate(ceiling);
            }
            continue;
        }
        let backlog = {
            let st = sh.state.lock().expect("send state");
            st.unacked_bytes > 0 || !sh.queue.1.is_empty()
        };
        let srtt = sh.counters.srtt_us.load(Relaxed) as f64;
        let min_rtt = sh.counters.min_rtt_us.load(Relaxed) as f64;
        let rate = sh.bucket.rate() as f64;
        if Instant::now() < hold_until {
            continue; // let the last decrease take effect before judging again
        }
        // Congestion: what gets through falls well short of what we send
        // (throughput stalls), or a heavy queue doubles the round trip.
        // Judged against the lowest rate of the window: while probing up
        // 10% a tick, what is delivered trails the newest rate by a round
        // trip, and comparing with the mean made a clear path look stalled
        // (the rate then stuck near its start; seen in CI).
        let lowest_rate = history.iter().map(|h| h.2).fold(f64::MAX, f64::min);
        let judged = history.len() >= 5 && span >= need * 0.95;
        let stalled = backlog && judged && delivered < lowest_rate.min(mean_rate) * 0.8;
        // A frame's round trip is timed from when it was written, so it
        // includes the frame's own time on the wire: allow for it (a 1 MiB
        // frame is 42 ms at 200 Mbit/s; without this every frame looked
        // queued and the rate sank to a tenth of such a link).
        let frames = sh.counters.frames_sent.load(Relaxed).max(1);
        let frame_bytes = sh.counters.bytes_sent.load(Relaxed) as f64 / frames as f64;
        let on_wire_us = frame_bytes / rate.max(delivered).max(1.0) * 1e6;
        let heavy_queue = min_rtt > 0.0 && srtt > 2.0 * min_rtt + 10_000.0 + on_wire_us;
        let next = if (stalled || heavy_queue) && delivered > 0.0 {
            hold_until = Instant::now()
                + Duration::from_micros((srtt * 2.0) as u64).max(Duration::from_millis(200));
            let newest = history.back().map_or(0.0, |h| h.1 / h.0.max(1e-3));
            history.clear();
            if std::mem::take(&mut slow_start) {
                // The rate has just overshot the link: what the last tick
                // delivered is the link (earlier ticks were still ramping).
                (newest.max(delivered) * 0.95).min(rate)
            } else if judged {
                (delivered * 0.95).min(rate)
            } else {
                // A queue seen before the window is long enough to say
                // what gets through: step down, not to a lumpy reading.
                rate * 0.85
            }
        } else if backlog && slow_start {
            rate * 2.0
        } else if backlog {
            rate * 1.1
        } else {
            rate
        };
        let floor = sh.cfg.min_rate_bytes_per_sec as f64;
        let mut next = next.max(floor) as u64;
        if ceiling != UNLIMITED {
            next = next.min(ceiling);
        }
        sh.bucket.set_rate(next.max(1));
    }
}
