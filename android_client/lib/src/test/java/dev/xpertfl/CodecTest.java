package dev.xpertfl;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import dev.xpertfl.fleet.Json;
import dev.xpertfl.fleet.NdArray;
import dev.xpertfl.fleet.ObjectTree;
import dev.xpertfl.fleet.ObjectTree.ObjectTreeException;
import dev.xpertfl.fleet.Records.ArrayRecord;
import dev.xpertfl.fleet.Records.ConfigRecord;
import dev.xpertfl.fleet.Records.MetricRecord;
import dev.xpertfl.fleet.Records.RecordDict;
import dev.xpertfl.proto.MessageProto;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import org.junit.Test;

/** JSON as Python writes it, NPY, and the object-tree codec including tampering and truncation. */
public class CodecTest {
    @Test
    public void pythonFloatRepr() {
        String[][] cases = {{"0.1", "0.1"}, {"1e-05", "0.00001"}, {"16.0", "16"}, {"1.5e+16", "1.5e16"}, {"1e+16", "1e16"},
                {"123456789.0", "123456789"}, {"0.0001", "0.0001"}, {"-2.5", "-2.5"}, {"0.30000000000000004", "0.30000000000000004"},
                {"Infinity", "Infinity"}, {"2e-07", "2e-7"}, {"9999999999999998.0", "9999999999999998"}};
        for (String[] c : cases) assertEquals(c[0], Json.pyRepr(Double.parseDouble(c[1])));
    }

    @Test
    public void jsonRoundTripKeepsOrderAndTypes() {
        String text = "{\"b\": 1, \"a\": [1.0, -2, \"x\\u00e9\\n\", true, null], \"inf\": Infinity}";
        Map<String, Object> m = Json.parseObject(text);
        assertEquals(Arrays.asList("b", "a", "inf"), new java.util.ArrayList<>(m.keySet()));
        assertEquals(1L, m.get("b"));
        assertEquals(text, Json.dumps(m));
        assertEquals("{\"a\": [1.0, -2, \"x\\u00e9\\n\", true, null], \"b\": 1, \"inf\": Infinity}", Json.dumpsSorted(m));
    }

    @Test
    public void npyMatchesNumpyLayout() {
        NdArray a = NdArray.ofFloats(new long[] {2, 3}, new float[] {1, 2, 3, 4, 5, 6});
        byte[] npy = a.toNpy();
        assertEquals(152, npy.length); // numpy.save: 128-byte header + 24 bytes
        String header = new String(npy, 10, 118, StandardCharsets.ISO_8859_1);
        assertTrue(header.startsWith("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"));
        assertTrue(header.endsWith(" \n"));
        NdArray back = NdArray.fromNpy(npy);
        assertArrayEquals(a.shape, back.shape);
        assertArrayEquals(a.toFloats(), back.toFloats(), 0f);
        try {
            NdArray.fromNpy(Arrays.copyOf(npy, npy.length - 4));
            fail("truncated NPY accepted");
        } catch (IllegalArgumentException e) {
            assertTrue(e.getMessage(), e.getMessage().contains("truncated"));
        }
    }

    private static ObjectTree.Encoded sample() {
        float[] big = new float[1_400_000]; // 5.6 MB: two chunks
        for (int i = 0; i < big.length; i++) big[i] = i % 7;
        RecordDict rd = new RecordDict()
                .put("arrays", new ArrayRecord().put("big", NdArray.ofFloats(new long[] {big.length}, big))
                        .put("same", NdArray.ofFloats(new long[] {2}, new float[] {0, 0}))
                        .put("same2", NdArray.ofFloats(new long[] {2}, new float[] {0, 0})))
                .put("cfg", new ConfigRecord().put("s", "x").put("i", 3).put("l", Arrays.asList(1.5, 2.5)))
                .put("m", new MetricRecord().put("loss", 0.5));
        MessageProto.Metadata md = MessageProto.Metadata.newBuilder().setRunId(7).setSrcNodeId(1).setDstNodeId(2)
                .setMessageType("train").setCreatedAt(1.8e9).setTtl(60).build();
        return ObjectTree.encodeMessage(md, rd, null);
    }

    @Test
    public void roundTrip() {
        ObjectTree.Encoded enc = sample();
        ObjectTree.Decoded d = ObjectTree.decode(enc.tree, enc.objects, enc.rootId);
        assertEquals("train", d.metadata.getMessageType());
        assertEquals(enc.rootId, d.metadata.getMessageId());
        float[] big = d.content.arrays("arrays").get("big").toFloats();
        assertEquals(1_400_000, big.length);
        assertEquals(6f, big[6], 0f);
        assertEquals("x", d.content.config("cfg").getString("s"));
        assertEquals(3L, d.content.config("cfg").get("i"));
        assertEquals(0.5, (Double) d.content.metrics("m").get("loss"), 0);
        // identical arrays are one object; ids are stable
        assertEquals(enc.rootId, ObjectTree.encodeMessage(d.metadata, d.content, null).rootId);
    }

    private static String chunkId(ObjectTree.Encoded enc) {
        for (Map.Entry<String, byte[]> e : enc.objects.entrySet()) {
            if (new String(e.getValue(), 0, 10, StandardCharsets.UTF_8).startsWith("ArrayChunk")) return e.getKey();
        }
        throw new AssertionError("no chunk");
    }

    @Test
    public void tamperedObjectIsRejected() {
        ObjectTree.Encoded enc = sample();
        Map<String, byte[]> objects = new HashMap<>(enc.objects);
        String id = chunkId(enc);
        byte[] bad = objects.get(id).clone();
        bad[bad.length - 1] ^= 1;
        objects.put(id, bad);
        try {
            ObjectTree.decode(enc.tree, objects, enc.rootId);
            fail("tampered object accepted");
        } catch (ObjectTreeException e) {
            assertTrue(e.getMessage(), e.getMessage().contains(id + " failed verification"));
        }
    }

    @Test
    public void missingObjectIsRejected() {
        ObjectTree.Encoded enc = sample();
        Map<String, byte[]> objects = new HashMap<>(enc.objects);
        objects.remove(chunkId(enc));
        try {
            ObjectTree.decode(enc.tree, objects, enc.rootId);
            fail("incomplete tree accepted");
        } catch (ObjectTreeException e) {
            assertTrue(e.getMessage(), e.getMessage().contains("was not received"));
        }
    }

    /** A truncated object under the id of its truncated bytes (hash consistent): the header catches it. */
    @Test
    public void truncatedObjectIsRejected() {
        byte[] content = "ConfigRecord  10\0abc".getBytes(StandardCharsets.UTF_8);
        String id = ObjectTree.sha256Hex(content);
        MessageProto.ObjectTree leaf = MessageProto.ObjectTree.newBuilder().setObjectId(id).build();
        String rdBody = "{\"c\": \"" + id + "\"}";
        byte[] rd = ("RecordDict " + id + " " + rdBody.length() + "\0" + rdBody).getBytes(StandardCharsets.UTF_8);
        String rdId = ObjectTree.sha256Hex(rd);
        byte[] msgBody = MessageProto.Message.newBuilder().setMetadata(MessageProto.Metadata.newBuilder().setMessageType("x")).build().toByteArray();
        byte[] msg = concat(("Message " + rdId + " " + msgBody.length + "\0").getBytes(StandardCharsets.UTF_8), msgBody);
        String msgId = ObjectTree.sha256Hex(msg);
        MessageProto.ObjectTree tree = MessageProto.ObjectTree.newBuilder().setObjectId(msgId)
                .addChildren(MessageProto.ObjectTree.newBuilder().setObjectId(rdId).addChildren(leaf)).build();
        Map<String, byte[]> objects = new HashMap<>();
        objects.put(id, content);
        objects.put(rdId, rd);
        objects.put(msgId, msg);
        try {
            ObjectTree.decode(tree, objects, msgId);
            fail("truncated object accepted");
        } catch (ObjectTreeException e) {
            assertTrue(e.getMessage(), e.getMessage().contains("declares a 10-byte body but has 3 bytes (truncated)"));
        }
        assertEquals(List.of(id, rdId, msgId), ObjectTree.postOrderIds(tree));
    }

    @Test
    public void treeMustMatchHeaders() {
        ObjectTree.Encoded enc = sample();
        MessageProto.ObjectTree pruned = enc.tree.toBuilder().setChildren(0, enc.tree.getChildren(0).toBuilder().removeChildren(0)).build();
        try {
            ObjectTree.decode(pruned, enc.objects, enc.rootId);
            fail("tree/header mismatch accepted");
        } catch (ObjectTreeException e) {
            assertTrue(e.getMessage(), e.getMessage().contains("but the tree gives"));
        }
    }

    private static byte[] concat(byte[] a, byte[] b) {
        byte[] out = Arrays.copyOf(a, a.length + b.length);
        System.arraycopy(b, 0, out, a.length, b.length);
        return out;
    }
}
