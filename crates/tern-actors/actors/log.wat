;; The log actor: appends every 16-byte message to a log in linear memory
;; (replying with the number of entries), and answers an 8-byte message
;; (start, count: two little-endian u32) with up to 4000 entries from
;; `start`. Tests send (sender, sequence) pairs and read the log back: it is
;; the actor's own record of what it handled, and in which order.
(module
  (memory (export "memory") 3)
  (global $count (export "count") (mut i32) (i32.const 0))
  (func (export "tern_inbox") (result i32) (i32.const 1024))
  (func (export "tern_handle") (param $len i32) (result i32)
    (local $at i32) (local $start i32) (local $n i32)
    (if (i32.eq (local.get $len) (i32.const 16))
      (then
        (local.set $at (i32.add (i32.const 0x20000) (i32.mul (global.get $count) (i32.const 16))))
        (if (i32.gt_u (i32.add (local.get $at) (i32.const 16))
                      (i32.mul (memory.size) (i32.const 65536)))
          (then
            (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1))
              (then (return (i32.const -2))))))
        (memory.copy (local.get $at) (i32.const 1024) (i32.const 16))
        (global.set $count (i32.add (global.get $count) (i32.const 1)))
        (i32.store (i32.const 1024) (global.get $count))
        (return (i32.const 4))))
    (if (i32.ne (local.get $len) (i32.const 8)) (then (return (i32.const -1))))
    (local.set $start (i32.load (i32.const 1024)))
    (local.set $n (i32.load (i32.const 1028)))
    (if (i32.gt_u (local.get $start) (global.get $count))
      (then (local.set $start (global.get $count))))
    (if (i32.gt_u (local.get $n) (i32.sub (global.get $count) (local.get $start)))
      (then (local.set $n (i32.sub (global.get $count) (local.get $start)))))
    (if (i32.gt_u (local.get $n) (i32.const 4000))
      (then (local.set $n (i32.const 4000))))
    (memory.copy (i32.const 1024)
      (i32.add (i32.const 0x20000) (i32.mul (local.get $start) (i32.const 16)))
      (i32.mul (local.get $n) (i32.const 16)))
    (i32.mul (local.get $n) (i32.const 16))))
