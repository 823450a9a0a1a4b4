package dev.xpertfl.fleet;

import com.google.protobuf.ByteString;
import com.google.protobuf.InvalidProtocolBufferException;
import dev.xpertfl.fleet.Records.ArrayRecord;
import dev.xpertfl.fleet.Records.ConfigRecord;
import dev.xpertfl.fleet.Records.MetricRecord;
import dev.xpertfl.fleet.Records.Record;
import dev.xpertfl.fleet.Records.RecordDict;
import dev.xpertfl.fleet.Records.ValueRecord;
import dev.xpertfl.proto.ErrorProto;
import dev.xpertfl.proto.MessageProto;
import dev.xpertfl.proto.RecorddictProto;
import java.io.ByteArrayOutputStream;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;

/**
 * Flower's content-addressed object trees (flwr 1.41 {@code InflatableObject}s), both directions.
 *
 * <p>A message travels as a tree: Message → RecordDict → records → (for an ArrayRecord) Arrays →
 * ArrayChunks. Each object is sent as its deflated bytes {@code "<Type> <child ids,> <body len>\0<body>"}
 * and identified by the SHA-256 of exactly those bytes. Bodies: Message = protobuf {@code Message}
 * with metadata (message_id empty) and error, no content; RecordDict / ArrayRecord = JSON
 * {@code {name: child id}}; Array = JSON {dtype, shape, stype, arraychunk_ids}; ArrayChunk = raw
 * slice (≤ 5 MiB) of the array's NPY bytes; Config/MetricRecord = their protobuf.
 *
 * <p>{@link #decode} checks everything a receiver can check: every object's hash against its id
 * (tampering), header syntax and body length (truncation), the types allowed at each level, that
 * the children named in each header are exactly the tree's children and the ones its body refers
 * to. Any failure is an {@link ObjectTreeException} naming the object and the reason.
 */
public final class ObjectTree {
    private ObjectTree() {}

    /** Flower's FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE default. */
    public static final int MAX_ARRAY_CHUNK_SIZE = 5 * 1024 * 1024;

    public static final class ObjectTreeException extends RuntimeException {
        public ObjectTreeException(String message) {
            super(message);
        }

        public ObjectTreeException(String message, Throwable cause) {
            super(message, cause);
        }
    }

    // --- ids -------------------------------------------------------------------------------------
    public static String sha256Hex(byte[] content) {
        try {
            byte[] d = MessageDigest.getInstance("SHA-256").digest(content);
            StringBuilder b = new StringBuilder(64);
            for (byte x : d) b.append(Character.forDigit((x >> 4) & 0xf, 16)).append(Character.forDigit(x & 0xf, 16));
            return b.toString();
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    }

    static byte[] withHeader(String type, List<String> childIds, byte[] body) {
        String head = type + " " + String.join(",", childIds) + " " + body.length;
        ByteArrayOutputStream out = new ByteArrayOutputStream(head.length() + 1 + body.length);
        byte[] h = head.getBytes(StandardCharsets.UTF_8);
        out.write(h, 0, h.length);
        out.write(0);
        out.write(body, 0, body.length);
        return out.toByteArray();
    }

    // --- encoding --------------------------------------------------------------------------------
    /** A message as objects: its root id, its tree, and each distinct object's bytes (children first). */
    public static final class Encoded {
        public final String rootId;
        public final MessageProto.ObjectTree tree;
        public final Map<String, byte[]> objects;

        Encoded(String rootId, MessageProto.ObjectTree tree, Map<String, byte[]> objects) {
            this.rootId = rootId;
            this.tree = tree;
            this.objects = objects;
        }

        public long totalBytes() {
            long n = 0;
            for (byte[] b : objects.values()) n += b.length;
            return n;
        }
    }

    private static final class Node {
        final String id;
        final byte[] content;
        final List<Node> children;

        Node(String type, List<Node> children, byte[] body) {
            this.children = children;
            List<String> ids = new ArrayList<>();
            for (Node c : children) if (!ids.contains(c.id)) ids.add(c.id);
            this.content = withHeader(type, ids, body);
            this.id = sha256Hex(content);
        }

        /** Unique children in first-occurrence order (Python's dict of children). */
        List<Node> unique() {
            Map<String, Node> u = new LinkedHashMap<>();
            for (Node c : children) u.putIfAbsent(c.id, c);
            return new ArrayList<>(u.values());
        }

        MessageProto.ObjectTree tree() {
            MessageProto.ObjectTree.Builder b = MessageProto.ObjectTree.newBuilder().setObjectId(id);
            for (Node c : unique()) b.addChildren(c.tree());
            return b.build();
        }

        void collect(Map<String, byte[]> out) {
            for (Node c : unique()) c.collect(out);
            out.putIfAbsent(id, content);
        }
    }

    /**
     * Encodes a message. {@code metadata}'s message_id is ignored (the id is the root object's hash).
     * Exactly one of {@code content} and {@code error} must be non-null.
     */
    public static Encoded encodeMessage(MessageProto.Metadata metadata, RecordDict content, ErrorProto.Error error) {
        if ((content == null) == (error == null)) throw new IllegalArgumentException("a message has content or an error");
        MessageProto.Message.Builder body = MessageProto.Message.newBuilder()
                .setMetadata(metadata.toBuilder().setMessageId(""));
        List<Node> children = new ArrayList<>();
        if (error != null) body.setError(error);
        if (content != null) children.add(recordDict(content));
        Node root = new Node("Message", children, deterministic(body.build()));
        Map<String, byte[]> objects = new LinkedHashMap<>();
        root.collect(objects);
        return new Encoded(root.id, root.tree(), objects);
    }

    static byte[] deterministic(com.google.protobuf.MessageLite m) {
        try {
            ByteArrayOutputStream bytes = new ByteArrayOutputStream();
            com.google.protobuf.CodedOutputStream out = com.google.protobuf.CodedOutputStream.newInstance(bytes);
            out.useDeterministicSerialization();
            m.writeTo(out);
            out.flush();
            return bytes.toByteArray();
        } catch (java.io.IOException e) {
            throw new IllegalStateException(e);
        }
    }

    private static Node recordDict(RecordDict rd) {
        List<Node> children = new ArrayList<>();
        Map<String, Object> refs = new LinkedHashMap<>();
        for (Map.Entry<String, Record> e : rd.records.entrySet()) {
            Node n = record(e.getValue());
            children.add(n);
            refs.put(e.getKey(), n.id);
        }
        return new Node("RecordDict", children, Json.dumps(refs).getBytes(StandardCharsets.UTF_8));
    }

    private static Node record(Record r) {
        if (r instanceof ArrayRecord) {
            List<Node> children = new ArrayList<>();
            Map<String, Object> refs = new LinkedHashMap<>();
            for (Map.Entry<String, NdArray> e : ((ArrayRecord) r).arrays.entrySet()) {
                Node n = array(e.getValue());
                children.add(n);
                refs.put(e.getKey(), n.id);
            }
            return new Node("ArrayRecord", children, Json.dumps(refs).getBytes(StandardCharsets.UTF_8));
        }
        if (r instanceof ConfigRecord) {
            RecorddictProto.ConfigRecord.Builder b = RecorddictProto.ConfigRecord.newBuilder();
            for (Map.Entry<String, Object> e : ((ConfigRecord) r).values.entrySet()) {
                b.addItems(RecorddictProto.ConfigRecord.Item.newBuilder().setKey(e.getKey()).setValue(configValue(e.getKey(), e.getValue())));
            }
            return new Node("ConfigRecord", java.util.Collections.emptyList(), b.build().toByteArray());
        }
        if (r instanceof MetricRecord) {
            RecorddictProto.MetricRecord.Builder b = RecorddictProto.MetricRecord.newBuilder();
            for (Map.Entry<String, Object> e : ((MetricRecord) r).values.entrySet()) {
                b.addItems(RecorddictProto.MetricRecord.Item.newBuilder().setKey(e.getKey()).setValue(metricValue(e.getKey(), e.getValue())));
            }
            return new Node("MetricRecord", java.util.Collections.emptyList(), b.build().toByteArray());
        }
        throw new IllegalArgumentException("unknown record type " + r.getClass());
    }

    private static Node array(NdArray a) {
        byte[] npy = a.toNpy();
        List<Node> chunks = new ArrayList<>();
        for (int start = 0; start < npy.length; start += MAX_ARRAY_CHUNK_SIZE) {
            byte[] part = Arrays.copyOfRange(npy, start, Math.min(npy.length, start + MAX_ARRAY_CHUNK_SIZE));
            chunks.add(new Node("ArrayChunk", java.util.Collections.emptyList(), part));
        }
        List<String> unique = new ArrayList<>();
        List<Long> indices = new ArrayList<>();
        for (Node c : chunks) {
            if (!unique.contains(c.id)) unique.add(c.id);
            indices.add((long) unique.indexOf(c.id));
        }
        Map<String, Object> meta = new LinkedHashMap<>();
        meta.put("dtype", a.dtype);
        meta.put("shape", a.shape);
        meta.put("stype", NdArray.STYPE_NUMPY);
        meta.put("arraychunk_ids", indices);
        return new Node("Array", chunks, Json.dumps(meta).getBytes(StandardCharsets.UTF_8));
    }

    private static RecorddictProto.ConfigRecordValue configValue(String key, Object v) {
        RecorddictProto.ConfigRecordValue.Builder b = RecorddictProto.ConfigRecordValue.newBuilder();
        if (v instanceof Boolean) return b.setBool((Boolean) v).build();
        if (v instanceof Long) return b.setSint64((Long) v).build();
        if (v instanceof Double) return b.setDouble((Double) v).build();
        if (v instanceof String) return b.setString((String) v).build();
        if (v instanceof byte[]) return b.setBytes(ByteString.copyFrom((byte[]) v)).build();
        if (v instanceof List) {
            List<?> l = (List<?>) v;
            Object first = l.isEmpty() ? null : ValueRecord.normalize(l.get(0));
            if (first == null || first instanceof Boolean) {
                RecorddictProto.BoolList.Builder x = RecorddictProto.BoolList.newBuilder();
                for (Object o : l) x.addVals((Boolean) o);
                return b.setBoolList(x).build();
            }
            if (first instanceof Long) {
                RecorddictProto.SintList.Builder x = RecorddictProto.SintList.newBuilder();
                for (Object o : l) x.addVals(((Number) o).longValue());
                return b.setSintList(x).build();
            }
            if (first instanceof Double) {
                RecorddictProto.DoubleList.Builder x = RecorddictProto.DoubleList.newBuilder();
                for (Object o : l) x.addVals(((Number) o).doubleValue());
                return b.setDoubleList(x).build();
            }
            if (first instanceof String) {
                RecorddictProto.StringList.Builder x = RecorddictProto.StringList.newBuilder();
                for (Object o : l) x.addVals((String) o);
                return b.setStringList(x).build();
            }
            if (first instanceof byte[]) {
                RecorddictProto.BytesList.Builder x = RecorddictProto.BytesList.newBuilder();
                for (Object o : l) x.addVals(ByteString.copyFrom((byte[]) o));
                return b.setBytesList(x).build();
            }
        }
        throw new IllegalArgumentException("config value '" + key + "' has unsupported type " + v.getClass());
    }

    private static RecorddictProto.MetricRecordValue metricValue(String key, Object v) {
        RecorddictProto.MetricRecordValue.Builder b = RecorddictProto.MetricRecordValue.newBuilder();
        if (v instanceof Long) return b.setSint64((Long) v).build();
        if (v instanceof Double) return b.setDouble((Double) v).build();
        if (v instanceof List) {
            List<?> l = (List<?>) v;
            Object first = l.isEmpty() ? null : ValueRecord.normalize(l.get(0));
            if (first instanceof Long) {
                RecorddictProto.SintList.Builder x = RecorddictProto.SintList.newBuilder();
                for (Object o : l) x.addVals(((Number) o).longValue());
                return b.setSintList(x).build();
            }
            RecorddictProto.DoubleList.Builder x = RecorddictProto.DoubleList.newBuilder();
            for (Object o : l) x.addVals(((Number) o).doubleValue());
            return b.setDoubleList(x).build();
        }
        throw new IllegalArgumentException("metric value '" + key + "' has unsupported type " + v.getClass());
    }

    // --- decoding --------------------------------------------------------------------------------
    /** A received message: metadata from the Message object itself, and its content or its error. */
    public static final class Decoded {
        public final String id;
        public final MessageProto.Metadata metadata;
        public final RecordDict content;
        public final ErrorProto.Error error;

        Decoded(String id, MessageProto.Metadata metadata, RecordDict content, ErrorProto.Error error) {
            this.id = id;
            this.metadata = metadata;
            this.content = content;
            this.error = error;
        }
    }

    /** All object ids of a tree, children before parents, each once. */
    public static List<String> postOrderIds(MessageProto.ObjectTree tree) {
        List<String> out = new ArrayList<>();
        Set<String> seen = new HashSet<>();
        postOrder(tree, out, seen, 0);
        return out;
    }

    private static void postOrder(MessageProto.ObjectTree t, List<String> out, Set<String> seen, int depth) {
        if (depth > 8) throw new ObjectTreeException("object tree deeper than a Flower message can be (object " + t.getObjectId() + ")");
        for (MessageProto.ObjectTree c : t.getChildrenList()) postOrder(c, out, seen, depth + 1);
        if (seen.add(t.getObjectId())) out.add(t.getObjectId());
    }

    private static final class Head {
        final String type;
        final List<String> children;
        final byte[] body;

        Head(String type, List<String> children, byte[] body) {
            this.type = type;
            this.children = children;
            this.body = body;
        }
    }

    private static Head head(String id, byte[] content) {
        String actual = sha256Hex(content);
        if (!actual.equals(id)) {
            throw new ObjectTreeException("object " + id + " failed verification: its content hashes to " + actual
                    + " (tampered or corrupted in transit)");
        }
        int sep = -1;
        for (int i = 0; i < content.length; i++) {
            if (content[i] == 0) {
                sep = i;
                break;
            }
        }
        if (sep < 0) throw new ObjectTreeException("object " + id + " has no header/body separator");
        String[] parts = new String(content, 0, sep, StandardCharsets.UTF_8).split(" ", -1);
        if (parts.length != 3) throw new ObjectTreeException("object " + id + " has a malformed header");
        long bodyLen;
        try {
            bodyLen = Long.parseLong(parts[2]);
        } catch (NumberFormatException e) {
            throw new ObjectTreeException("object " + id + " has a malformed body length '" + parts[2] + "'");
        }
        long actualLen = content.length - sep - 1;
        if (bodyLen != actualLen) {
            throw new ObjectTreeException("object " + id + " (" + parts[0] + ") declares a " + bodyLen + "-byte body but has "
                    + actualLen + " bytes (truncated)");
        }
        List<String> children = parts[1].isEmpty() ? java.util.Collections.emptyList() : Arrays.asList(parts[1].split(","));
        return new Head(parts[0], children, Arrays.copyOfRange(content, sep + 1, content.length));
    }

    /**
     * Rebuilds a message from its tree and the pulled object contents (verified as described above).
     * {@code expectedId}: the message id announced by the SuperLink (the root must have it).
     */
    public static Decoded decode(MessageProto.ObjectTree tree, Map<String, byte[]> contents, String expectedId) {
        if (expectedId != null && !expectedId.isEmpty() && !tree.getObjectId().equals(expectedId)) {
            throw new ObjectTreeException("object tree root " + tree.getObjectId() + " is not the announced message " + expectedId);
        }
        Head h = node(tree, contents, "Message");
        MessageProto.Message m;
        try {
            m = MessageProto.Message.parseFrom(h.body);
        } catch (InvalidProtocolBufferException e) {
            throw new ObjectTreeException("message object " + tree.getObjectId() + " has an unreadable body", e);
        }
        if (m.hasError()) {
            if (!h.children.isEmpty()) throw new ObjectTreeException("message " + tree.getObjectId() + " has an error and content");
            return new Decoded(tree.getObjectId(), m.getMetadata(), null, m.getError());
        }
        if (h.children.size() != 1) {
            throw new ObjectTreeException("message " + tree.getObjectId() + " must have exactly one RecordDict, has " + h.children.size());
        }
        RecordDict rd = decodeRecordDict(tree.getChildren(0), contents);
        return new Decoded(tree.getObjectId(), m.getMetadata().toBuilder().setMessageId(tree.getObjectId()).build(), rd, null);
    }

    /** Verifies one object against its tree node and returns its parsed head. */
    private static Head node(MessageProto.ObjectTree t, Map<String, byte[]> contents, String... allowedTypes) {
        byte[] content = contents.get(t.getObjectId());
        if (content == null) throw new ObjectTreeException("object " + t.getObjectId() + " was not received");
        Head h = head(t.getObjectId(), content);
        if (!Arrays.asList(allowedTypes).contains(h.type)) {
            throw new ObjectTreeException("object " + t.getObjectId() + " is a " + h.type + ", expected " + String.join(" or ", allowedTypes));
        }
        List<String> treeChildren = new ArrayList<>();
        for (MessageProto.ObjectTree c : t.getChildrenList()) treeChildren.add(c.getObjectId());
        if (!treeChildren.equals(h.children)) {
            throw new ObjectTreeException("object " + t.getObjectId() + " (" + h.type + ") names children " + h.children
                    + " but the tree gives " + treeChildren);
        }
        return h;
    }

    private static Map<String, Object> refs(Head h, String id) {
        Map<String, Object> refs;
        try {
            refs = Json.parseObject(new String(h.body, StandardCharsets.UTF_8));
        } catch (IllegalArgumentException e) {
            throw new ObjectTreeException(h.type + " " + id + ": body is not a JSON object (" + e.getMessage() + ")");
        }
        Set<Object> named = new HashSet<>(refs.values());
        if (!named.equals(new HashSet<Object>(h.children))) {
            throw new ObjectTreeException(h.type + " " + id + ": its entries refer to " + named + " but its children are " + h.children);
        }
        return refs;
    }

    private static RecordDict decodeRecordDict(MessageProto.ObjectTree t, Map<String, byte[]> contents) {
        Head h = node(t, contents, "RecordDict");
        Map<String, Object> refs = refs(h, t.getObjectId());
        Map<String, Record> byId = new LinkedHashMap<>();
        for (MessageProto.ObjectTree c : t.getChildrenList()) byId.put(c.getObjectId(), decodeRecord(c, contents));
        RecordDict rd = new RecordDict();
        for (Map.Entry<String, Object> e : refs.entrySet()) rd.put(e.getKey(), byId.get((String) e.getValue()));
        return rd;
    }

    private static Record decodeRecord(MessageProto.ObjectTree t, Map<String, byte[]> contents) {
        Head h = node(t, contents, "ArrayRecord", "ConfigRecord", "MetricRecord");
        try {
            switch (h.type) {
                case "ArrayRecord": {
                    Map<String, Object> refs = refs(h, t.getObjectId());
                    Map<String, NdArray> byId = new LinkedHashMap<>();
                    for (MessageProto.ObjectTree c : t.getChildrenList()) byId.put(c.getObjectId(), decodeArray(c, contents));
                    ArrayRecord r = new ArrayRecord();
                    for (Map.Entry<String, Object> e : refs.entrySet()) r.put(e.getKey(), byId.get((String) e.getValue()));
                    return r;
                }
                case "ConfigRecord": {
                    ConfigRecord r = new ConfigRecord();
                    for (RecorddictProto.ConfigRecord.Item it : RecorddictProto.ConfigRecord.parseFrom(h.body).getItemsList()) {
                        r.values.put(it.getKey(), configValue(it.getValue()));
                    }
                    return r;
                }
                default: {
                    MetricRecord r = new MetricRecord();
                    for (RecorddictProto.MetricRecord.Item it : RecorddictProto.MetricRecord.parseFrom(h.body).getItemsList()) {
                        r.values.put(it.getKey(), metricValue(it.getValue()));
                    }
                    return r;
                }
            }
        } catch (InvalidProtocolBufferException e) {
            throw new ObjectTreeException(h.type + " " + t.getObjectId() + " has an unreadable body", e);
        }
    }

    private static NdArray decodeArray(MessageProto.ObjectTree t, Map<String, byte[]> contents) {
        Head h = node(t, contents, "Array");
        Map<String, Object> meta;
        try {
            meta = Json.parseObject(new String(h.body, StandardCharsets.UTF_8));
        } catch (IllegalArgumentException e) {
            throw new ObjectTreeException("Array " + t.getObjectId() + ": body is not a JSON object");
        }
        if (!NdArray.STYPE_NUMPY.equals(meta.get("stype"))) {
            throw new ObjectTreeException("Array " + t.getObjectId() + ": unsupported stype " + meta.get("stype"));
        }
        Object idx = meta.get("arraychunk_ids");
        if (!(idx instanceof List)) throw new ObjectTreeException("Array " + t.getObjectId() + ": no arraychunk_ids");
        Map<String, byte[]> chunks = new LinkedHashMap<>();
        for (MessageProto.ObjectTree c : t.getChildrenList()) {
            Head ch = node(c, contents, "ArrayChunk");
            if (!ch.children.isEmpty()) throw new ObjectTreeException("ArrayChunk " + c.getObjectId() + " has children");
            chunks.put(c.getObjectId(), ch.body);
        }
        ByteArrayOutputStream npy = new ByteArrayOutputStream();
        Set<String> used = new HashSet<>();
        for (Object o : (List<?>) idx) {
            if (!(o instanceof Long) || (Long) o < 0 || (Long) o >= h.children.size()) {
                throw new ObjectTreeException("Array " + t.getObjectId() + ": bad chunk index " + o);
            }
            String id = h.children.get(((Long) o).intValue());
            used.add(id);
            byte[] b = chunks.get(id);
            npy.write(b, 0, b.length);
        }
        if (!used.equals(chunks.keySet())) throw new ObjectTreeException("Array " + t.getObjectId() + ": chunk list does not match its children");
        NdArray a;
        try {
            a = NdArray.fromNpy(npy.toByteArray());
        } catch (IllegalArgumentException e) {
            throw new ObjectTreeException("Array " + t.getObjectId() + ": " + e.getMessage());
        }
        Object dtype = meta.get("dtype");
        Object shape = meta.get("shape");
        List<Long> declared = new ArrayList<>();
        if (shape instanceof List) for (Object o : (List<?>) shape) declared.add(o instanceof Long ? (Long) o : -1L);
        List<Long> actual = new ArrayList<>();
        for (long d : a.shape) actual.add(d);
        if (!a.dtype.equals(dtype) || !declared.equals(actual)) {
            throw new ObjectTreeException("Array " + t.getObjectId() + ": declared " + dtype + shape + " but holds " + a);
        }
        return a;
    }

    private static Object configValue(RecorddictProto.ConfigRecordValue v) {
        switch (v.getValueCase()) {
            case BOOL: return v.getBool();
            case SINT64: return v.getSint64();
            case UINT64: return v.getUint64();
            case DOUBLE: return v.getDouble();
            case STRING: return v.getString();
            case BYTES: return v.getBytes().toByteArray();
            case BOOL_LIST: return new ArrayList<Object>(v.getBoolList().getValsList());
            case SINT_LIST: return new ArrayList<Object>(v.getSintList().getValsList());
            case UINT_LIST: return new ArrayList<Object>(v.getUintList().getValsList());
            case DOUBLE_LIST: return new ArrayList<Object>(v.getDoubleList().getValsList());
            case STRING_LIST: return new ArrayList<Object>(v.getStringList().getValsList());
            case BYTES_LIST: {
                List<Object> out = new ArrayList<>();
                for (ByteString b : v.getBytesList().getValsList()) out.add(b.toByteArray());
                return out;
            }
            default: throw new ObjectTreeException("config value without a type");
        }
    }

    private static Object metricValue(RecorddictProto.MetricRecordValue v) {
        switch (v.getValueCase()) {
            case SINT64: return v.getSint64();
            case UINT64: return v.getUint64();
            case DOUBLE: return v.getDouble();
            case SINT_LIST: return new ArrayList<Object>(v.getSintList().getValsList());
            case UINT_LIST: return new ArrayList<Object>(v.getUintList().getValsList());
            case DOUBLE_LIST: return new ArrayList<Object>(v.getDoubleList().getValsList());
            default: throw new ObjectTreeException("metric value without a type");
        }
    }
}
