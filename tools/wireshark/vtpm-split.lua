-- Wireshark/tshark dissector for vtpm-split capture events (docs/observability.md): the records a
-- vtpm-split backend writes on the LINKTYPE_USER0 interface of a `--pcap` capture, next to the TPM
-- commands it writes as TCP port 2321 (decoded by Wireshark's own TPM 2.0 dissector).
--   tshark -X lua_script:tools/wireshark/vtpm-split.lua -r guest.pcapng
--   wireshark: copy it to ~/.local/lib/wireshark/plugins/
--
-- Record: version u8 (1), kind u8 (1 xenstore, 2 ring, 3 note, 4 guest xenstore), direction u8 (1: to
-- the backend; guest xenstore: 1 from the guest), reserved u8, domid u16be, devid u16be, then the body:
--   xenstore, guest xenstore: one xs_wire packet (type, req_id, tx_id, len: u32 little-endian; payload)
--   ring:     event u8, status-or-locality u8, segments u16be, length u32be, request id u64be
--   note:     UTF-8 text

local p = Proto("vtpmsplit", "vtpm-split capture event")

local KINDS = { [1] = "xenstore", [2] = "ring", [3] = "note", [4] = "guest xenstore" }
local DIRS = { [0] = "from the backend (guest xenstore: to the guest)", [1] = "to the backend (guest xenstore: from the guest)" }
local RING_EVENTS = {
  [1] = "event channel notified the backend",
  [2] = "request taken off the ring",
  [3] = "response put on the ring",
  [4] = "backend notified the frontend",
  [5] = "v2 SUBMIT",
  [6] = "v2 FINISH",
  [7] = "v2 CANCEL",
}
local XS_TYPES = {
  [0] = "CONTROL", [1] = "DIRECTORY", [2] = "READ", [3] = "GET_PERMS", [4] = "WATCH", [5] = "UNWATCH",
  [6] = "TRANSACTION_START", [7] = "TRANSACTION_END", [8] = "INTRODUCE", [9] = "RELEASE",
  [10] = "GET_DOMAIN_PATH", [11] = "WRITE", [12] = "MKDIR", [13] = "RM", [14] = "SET_PERMS",
  [15] = "WATCH_EVENT", [16] = "ERROR", [17] = "IS_DOMAIN_INTRODUCED", [18] = "RESUME",
  [19] = "SET_TARGET", [21] = "RESET_WATCHES", [22] = "DIRECTORY_PART", [23] = "GET_FEATURE",
  [24] = "SET_FEATURE", [25] = "GET_QUOTA", [26] = "SET_QUOTA",
}

local f = {
  version = ProtoField.uint8("vtpmsplit.version", "Version"),
  kind = ProtoField.uint8("vtpmsplit.kind", "Kind", base.DEC, KINDS),
  dir = ProtoField.uint8("vtpmsplit.dir", "Direction", base.DEC, DIRS),
  domid = ProtoField.uint16("vtpmsplit.domid", "Guest domid"),
  devid = ProtoField.uint16("vtpmsplit.devid", "Device id"),
  xs_type = ProtoField.uint32("vtpmsplit.xs.type", "xs_wire type", base.DEC, XS_TYPES),
  xs_req = ProtoField.uint32("vtpmsplit.xs.req_id", "Request id"),
  xs_tx = ProtoField.uint32("vtpmsplit.xs.tx_id", "Transaction id"),
  xs_len = ProtoField.uint32("vtpmsplit.xs.len", "Payload length"),
  xs_arg = ProtoField.string("vtpmsplit.xs.arg", "Argument"),
  ring_event = ProtoField.uint8("vtpmsplit.ring.event", "Ring event", base.DEC, RING_EVENTS),
  ring_status = ProtoField.uint8("vtpmsplit.ring.status", "Status or locality"),
  ring_segments = ProtoField.uint16("vtpmsplit.ring.segments", "Segments"),
  ring_length = ProtoField.uint32("vtpmsplit.ring.length", "Length"),
  ring_id = ProtoField.uint64("vtpmsplit.ring.id", "Request id"),
  note = ProtoField.string("vtpmsplit.note", "Note"),
}
p.fields = { f.version, f.kind, f.dir, f.domid, f.devid, f.xs_type, f.xs_req, f.xs_tx, f.xs_len, f.xs_arg,
  f.ring_event, f.ring_status, f.ring_segments, f.ring_length, f.ring_id, f.note }

-- Printable form of one NUL-separated argument (guest bytes: shown escaped, never raw).
local function printable(s)
  return (s:gsub("[^\32-\126]", function(c) return string.format("\\x%02x", c:byte()) end))
end

local function xenstore(buf, tree, label)
  if buf:len() < 16 then return "short xs_wire packet" end
  local t = buf(0, 4):le_uint()
  local n = buf(12, 4):le_uint()
  tree:add_le(f.xs_type, buf(0, 4))
  tree:add_le(f.xs_req, buf(4, 4))
  tree:add_le(f.xs_tx, buf(8, 4))
  tree:add_le(f.xs_len, buf(12, 4))
  local args = {}
  local avail = math.min(n, buf:len() - 16)
  if avail > 0 then
    local start = 16
    local stop = 16 + avail
    for i = 16, stop do
      if i == stop or buf(i, 1):uint() == 0 then
        if i > start then
          local s = printable(buf(start, i - start):raw())
          tree:add(f.xs_arg, buf(start, i - start), s)
          args[#args + 1] = s
        end
        start = i + 1
      end
    end
  end
  return string.format("%s %s %s", label, XS_TYPES[t] or ("type " .. t), table.concat(args, " "))
end

local function ring(buf, tree)
  if buf:len() < 16 then return "short ring record" end
  local e = buf(0, 1):uint()
  tree:add(f.ring_event, buf(0, 1))
  tree:add(f.ring_status, buf(1, 1))
  tree:add(f.ring_segments, buf(2, 2))
  tree:add(f.ring_length, buf(4, 4))
  tree:add(f.ring_id, buf(8, 8))
  local s = RING_EVENTS[e] or ("ring event " .. e)
  if e == 2 or e == 3 then s = s .. string.format(" id %s len %d", buf(8, 8):uint64():tonumber(), buf(4, 4):uint()) end
  if e == 3 then s = s .. string.format(" status %d", buf(1, 1):uint()) end
  if e == 5 or e == 6 then s = s .. string.format(" len %d", buf(4, 4):uint()) end
  return s
end

function p.dissector(buf, pinfo, root)
  if buf:len() < 8 then return 0 end
  pinfo.cols.protocol = "vtpm-split"
  local tree = root:add(p, buf())
  tree:add(f.version, buf(0, 1))
  tree:add(f.kind, buf(1, 1))
  tree:add(f.dir, buf(2, 1))
  tree:add(f.domid, buf(4, 2))
  tree:add(f.devid, buf(6, 2))
  local kind = buf(1, 1):uint()
  local body = buf(8)
  local info
  local arrow = buf(2, 1):uint() == 1 and "->" or "<-"
  if buf:len() == 8 then info = "empty record"
  elseif kind == 1 then info = xenstore(body:tvb(), tree, "xenstore")
  elseif kind == 4 then
    -- The guest's own connection: "->" is the guest's request, "<-" xenstored's reply or watch event.
    info = xenstore(body:tvb(), tree, "guest xenstore")
  elseif kind == 2 then info = ring(body:tvb(), tree)
  elseif kind == 3 then
    local s = printable(body:raw())
    tree:add(f.note, body, s)
    info = "note: " .. s
  else info = "unknown kind " .. kind end
  pinfo.cols.info = string.format("dom%d %s %s", buf(4, 2):uint(), arrow, info)
  return buf:len()
end

local encaps = wtap_encaps or wtap
DissectorTable.get("wtap_encap"):add(encaps.USER0, p)
