;; The counter actor: adds each message (a little-endian i64) to a total kept
;; in linear memory, counts the messages it handled in an exported mutable
;; global, and replies with the total. An empty message makes it spin
;; forever: the runtime's fuel budget must stop it.
(module
  (memory (export "memory") 1)
  (global $handled (export "handled") (mut i64) (i64.const 0))
  (func (export "tern_inbox") (result i32) (i32.const 1024))
  (func (export "tern_handle") (param $len i32) (result i32)
    (if (i32.eqz (local.get $len)) (then (loop $spin (br $spin))))
    (if (i32.ne (local.get $len) (i32.const 8)) (then (return (i32.const -1))))
    (i64.store (i32.const 0) (i64.add (i64.load (i32.const 0)) (i64.load (i32.const 1024))))
    (global.set $handled (i64.add (global.get $handled) (i64.const 1)))
    (i64.store (i32.const 1024) (i64.load (i32.const 0)))
    (i32.const 8)))
