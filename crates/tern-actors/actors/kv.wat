;; The key-value actor: a 65,536-slot open-addressing table of u64 keys and
;; values in linear memory (at 64 KiB), plus operations that grow memory and
;; write patterns, so tests and benchmarks can give it any size of state and
;; any rate of writes. Messages (offsets within the message):
;;   1 put:   key u64 @8 (not 0), value u64 @16     -> empty reply
;;   2 get:   key u64 @8                            -> value u64, or -2 if absent
;;   3 grow:  wasm pages u32 @4                     -> old size in pages (u32), or -3
;;   4 touch: offset u32 @4, count u32 @8, stride u32 @12, byte @16
;;            writes the byte `count` times, `stride` apart -> empty reply
;;   5 peek:  offset u32 @4                         -> the byte there
;; An empty message spins forever (fuel stops it).
(module
  (memory (export "memory") 32)
  (global $entries (export "entries") (mut i32) (i32.const 0))
  (func (export "tern_inbox") (result i32) (i32.const 1024))

  ;; The address of the slot holding `key`, or of the empty slot where it
  ;; goes; -1 when the table is full.
  (func $slot (param $key i64) (result i32)
    (local $i i32) (local $n i32) (local $addr i32) (local $k i64)
    (local.set $i (i32.wrap_i64 (i64.shr_u
      (i64.mul (local.get $key) (i64.const 0x9E3779B97F4A7C15)) (i64.const 48))))
    (block $done
      (loop $probe
        (local.set $addr (i32.add (i32.const 65536) (i32.shl (local.get $i) (i32.const 4))))
        (local.set $k (i64.load (local.get $addr)))
        (br_if $done (i64.eq (local.get $k) (local.get $key)))
        (br_if $done (i64.eqz (local.get $k)))
        (local.set $i (i32.and (i32.add (local.get $i) (i32.const 1)) (i32.const 0xffff)))
        (local.set $n (i32.add (local.get $n) (i32.const 1)))
        (br_if $probe (i32.lt_u (local.get $n) (i32.const 65536)))
        (local.set $addr (i32.const -1))))
    (local.get $addr))

  (func (export "tern_handle") (param $len i32) (result i32)
    (local $op i32) (local $addr i32) (local $i i32) (local $p i32) (local $old i32)
    (if (i32.eqz (local.get $len)) (then (loop $spin (br $spin))))
    (local.set $op (i32.load8_u (i32.const 1024)))
    (if (i32.eq (local.get $op) (i32.const 1)) (then
      (if (i64.eqz (i64.load (i32.const 1032))) (then (return (i32.const -4))))
      (local.set $addr (call $slot (i64.load (i32.const 1032))))
      (if (i32.eq (local.get $addr) (i32.const -1)) (then (return (i32.const -5))))
      (if (i64.eqz (i64.load (local.get $addr)))
        (then (global.set $entries (i32.add (global.get $entries) (i32.const 1)))))
      (i64.store (local.get $addr) (i64.load (i32.const 1032)))
      (i64.store offset=8 (local.get $addr) (i64.load (i32.const 1040)))
      (return (i32.const 0))))
    (if (i32.eq (local.get $op) (i32.const 2)) (then
      (local.set $addr (call $slot (i64.load (i32.const 1032))))
      (if (i32.eq (local.get $addr) (i32.const -1)) (then (return (i32.const -2))))
      (if (i64.eqz (i64.load (local.get $addr))) (then (return (i32.const -2))))
      (i64.store (i32.const 1024) (i64.load offset=8 (local.get $addr)))
      (return (i32.const 8))))
    (if (i32.eq (local.get $op) (i32.const 3)) (then
      (local.set $old (memory.grow (i32.load (i32.const 1028))))
      (if (i32.eq (local.get $old) (i32.const -1)) (then (return (i32.const -3))))
      (i32.store (i32.const 1024) (local.get $old))
      (return (i32.const 4))))
    (if (i32.eq (local.get $op) (i32.const 4)) (then
      (local.set $p (i32.load (i32.const 1028)))
      (block $end
        (loop $write
          (br_if $end (i32.ge_u (local.get $i) (i32.load (i32.const 1032))))
          (i32.store8 (local.get $p) (i32.load8_u (i32.const 1040)))
          (local.set $p (i32.add (local.get $p) (i32.load (i32.const 1036))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $write)))
      (return (i32.const 0))))
    (if (i32.eq (local.get $op) (i32.const 5)) (then
      (i32.store8 (i32.const 1024) (i32.load8_u (i32.load (i32.const 1028))))
      (return (i32.const 1))))
    (i32.const -1)))
