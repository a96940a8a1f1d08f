//! Port-I/O devices: the 16550 serial console (vm-superio), the i8042
//! controller (for its reset line), and the tern guest agent.

use crate::VmmError;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use vm_superio::{I8042Device, Serial, SerialState, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1 base port.
pub const SERIAL_PORT: u16 = 0x3f8;
/// i8042 data and command ports.
pub const I8042_PORTS: [u16; 2] = [0x60, 0x64];
/// Agent ports: counter lo, counter hi (commits), checksum lo, checksum hi (commits).
pub const AGENT_PORTS: [u16; 4] = [0x510, 0x511, 0x512, 0x513];
/// The serial console's interrupt line (GSI).
pub const SERIAL_IRQ: u32 = 4;
/// Console bytes kept in memory for the driver to read.
pub const CONSOLE_RING_BYTES: usize = 64 << 10;

/// An edge on a KVM irqfd: how the serial port raises its interrupt.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The i8042 reset line: a guest asking to reboot or power off ends the VM.
#[derive(Clone, Default)]
pub struct ResetLine(pub Arc<AtomicBool>);

impl Trigger for ResetLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// Where console output goes: a bounded ring the driver can read, an
/// optional log file, and an optional live copy (e.g. the user's terminal).
pub struct ConsoleSink {
    ring: VecDeque<u8>,
    total: u64,
    log: Option<std::fs::File>,
    tee: Option<Box<dyn Write + Send>>,
}

impl ConsoleSink {
    /// A sink writing to `log` and `tee` as well as the ring.
    pub fn new(log: Option<std::fs::File>, tee: Option<Box<dyn Write + Send>>) -> Self {
        Self {
            ring: VecDeque::with_capacity(4096),
            total: 0,
            log,
            tee,
        }
    }

    /// The last bytes written (at most [`CONSOLE_RING_BYTES`]), as text.
    pub fn text(&self) -> String {
        let (a, b) = self.ring.as_slices();
        let mut v = Vec::with_capacity(a.len() + b.len());
        v.extend_from_slice(a);
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).into_owned()
    }

    /// Whether `pattern` occurs in the last 4 KiB of output (cheap enough to
    /// ask after every byte the guest writes).
    pub fn recent_contains(&self, pattern: &str) -> bool {
        let p = pattern.as_bytes();
        let n = self.ring.len();
        if p.is_empty() || p.len() > n {
            return false;
        }
        (n.saturating_sub(4096)..=n - p.len()).any(|start| {
            p.iter()
                .enumerate()
                .all(|(i, b)| self.ring[start + i] == *b)
        })
    }

    /// Bytes written since the VM started (this process).
    pub fn total_bytes(&self) -> u64 {
        self.total
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.total += buf.len() as u64;
        self.ring.extend(buf);
        let excess = self.ring.len().saturating_sub(CONSOLE_RING_BYTES);
        self.ring.drain(..excess);
        // Log and terminal failures must not stop the guest.
        if let Some(f) = &mut self.log {
            let _ = f.write_all(buf);
        }
        if let Some(t) = &mut self.tee {
            let _ = t.write_all(buf);
            let _ = t.flush();
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the guest agent last reported.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    /// Last committed counter.
    pub counter: u64,
    /// Last committed working-set checksum, with the counter it was taken at.
    pub checksum: Option<(u64, u64)>,
    /// Counter reports received by this process.
    pub reports: u64,
    /// Half-written values (the low words), kept so a snapshot between the
    /// two halves of a report loses nothing.
    pub pending_lo: u32,
    /// Low word of a checksum being reported.
    pub pending_sum_lo: u32,
}

/// The serial port's registers, as saved in a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct SerialSection {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// Every port-I/O device of a machine.
pub struct Devices {
    serial: Serial<IrqLine, vm_superio::serial::NoEvents, ConsoleSink>,
    i8042: I8042Device<ResetLine>,
    reset: ResetLine,
    /// What the guest agent reported.
    pub agent: AgentReport,
}

impl Devices {
    /// Devices in their power-on state.
    pub fn new(serial_irq: EventFd, console: ConsoleSink) -> Self {
        let reset = ResetLine::default();
        Self {
            serial: Serial::new(IrqLine(serial_irq), console),
            i8042: I8042Device::new(reset.clone()),
            reset,
            agent: AgentReport::default(),
        }
    }

    /// The console output.
    pub fn console(&self) -> &ConsoleSink {
        self.serial.writer()
    }

    /// Whether the guest pulsed the reset line (reboot or power-off).
    pub fn reset_requested(&self) -> bool {
        self.reset.0.load(Ordering::SeqCst)
    }

    /// Serves an IN from the guest.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        let v = match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) => {
                self.serial.read((p - SERIAL_PORT) as u8)
            }
            p if I8042_PORTS.contains(&p) => self.i8042.read((p - 0x60) as u8),
            // Nothing there: an ISA bus floats high.
            _ => 0xff,
        };
        data.fill(v);
    }

    /// Serves an OUT from the guest. Returns true when an agent report
    /// committed or console text arrived (waiters may want to look).
    pub fn pio_write(&mut self, port: u16, data: &[u8]) -> bool {
        let word = || {
            let mut b = [0u8; 4];
            let n = data.len().min(4);
            b[..n].copy_from_slice(&data[..n]);
            u32::from_le_bytes(b)
        };
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) => {
                let off = (p - SERIAL_PORT) as u8;
                if let Err(e) = self.serial.write(off, data.first().copied().unwrap_or(0)) {
                    tracing::warn!(error = ?e, "serial write failed");
                }
                off == 0
            }
            p if I8042_PORTS.contains(&p) => {
                let _ = self
                    .i8042
                    .write((p - 0x60) as u8, data.first().copied().unwrap_or(0));
                false
            }
            p if p == AGENT_PORTS[0] => {
                self.agent.pending_lo = word();
                false
            }
            p if p == AGENT_PORTS[1] => {
                self.agent.counter = u64::from(word()) << 32 | u64::from(self.agent.pending_lo);
                self.agent.reports += 1;
                true
            }
            p if p == AGENT_PORTS[2] => {
                self.agent.pending_sum_lo = word();
                false
            }
            p if p == AGENT_PORTS[3] => {
                let sum = u64::from(word()) << 32 | u64::from(self.agent.pending_sum_lo);
                self.agent.checksum = Some((self.agent.counter, sum));
                true
            }
            _ => {
                tracing::trace!(port, "write to an unclaimed port");
                false
            }
        }
    }

    /// The serial port's registers.
    pub fn serial_state(&self) -> SerialSection {
        let s = self.serial.state();
        SerialSection {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Rebuilds the serial port from saved registers, keeping its interrupt
    /// line and console sink.
    pub fn restore_serial(&mut self, s: &SerialSection, irq: EventFd) -> Result<(), VmmError> {
        let state = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let sink = std::mem::replace(self.serial.writer_mut(), ConsoleSink::new(None, None));
        self.serial = Serial::from_state(&state, IrqLine(irq), vm_superio::serial::NoEvents, sink)
            .map_err(|e| VmmError::State(format!("serial state: {e:?}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> Devices {
        Devices::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ConsoleSink::new(None, None),
        )
    }

    #[test]
    fn serial_text_reaches_the_ring() {
        let mut d = devices();
        for b in b"hello\n" {
            d.pio_write(SERIAL_PORT, &[*b]);
        }
        assert_eq!(d.console().text(), "hello\n");
        let mut lsr = [0u8];
        d.pio_read(SERIAL_PORT + 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter holding register empty");
    }

    #[test]
    fn agent_reports_commit_on_the_high_word() {
        let mut d = devices();
        d.pio_write(AGENT_PORTS[0], &5u32.to_le_bytes());
        assert_eq!(d.agent.counter, 0);
        d.pio_write(AGENT_PORTS[1], &1u32.to_le_bytes());
        assert_eq!(d.agent.counter, (1 << 32) | 5);
        d.pio_write(AGENT_PORTS[2], &9u32.to_le_bytes());
        d.pio_write(AGENT_PORTS[3], &0u32.to_le_bytes());
        assert_eq!(d.agent.checksum, Some(((1 << 32) | 5, 9)));
    }

    #[test]
    fn i8042_reset_command_raises_the_line() {
        let mut d = devices();
        assert!(!d.reset_requested());
        d.pio_write(0x64, &[0xfe]);
        assert!(d.reset_requested());
    }

    #[test]
    fn ring_keeps_the_tail() {
        let mut s = ConsoleSink::new(None, None);
        s.write_all(&vec![b'a'; CONSOLE_RING_BYTES]).unwrap();
        s.write_all(b"tail").unwrap();
        assert!(s.text().ends_with("tail"));
        assert_eq!(s.text().len(), CONSOLE_RING_BYTES);
        assert_eq!(s.total_bytes(), CONSOLE_RING_BYTES as u64 + 4);
    }
}
