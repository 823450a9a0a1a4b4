package dev.xpertfl.fleet;

import dev.xpertfl.proto.MessageProto;
import java.io.File;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.Base64;
import java.util.LinkedHashMap;
import java.util.Map;

/**
 * Cross-language check used by the Python tests: decodes a message written by Python's Flower
 * (JSON {"tree": base64 ObjectTree, "objects": {id: base64 content}}), verifies it, re-encodes it
 * here and prints {"root": id, "ids": [...]} so the test can compare object ids byte for byte.
 */
public final class CodecCheck {
    private CodecCheck() {}

    @SuppressWarnings("unchecked")
    public static void main(String[] args) throws Exception {
        Map<String, Object> doc = Json.parseObject(new String(Files.readAllBytes(new File(args[0]).toPath()), StandardCharsets.UTF_8));
        MessageProto.ObjectTree tree = MessageProto.ObjectTree.parseFrom(Base64.getDecoder().decode((String) doc.get("tree")));
        Map<String, byte[]> objects = new LinkedHashMap<>();
        for (Map.Entry<String, Object> e : ((Map<String, Object>) doc.get("objects")).entrySet()) {
            objects.put(e.getKey(), Base64.getDecoder().decode((String) e.getValue()));
        }
        ObjectTree.Decoded d = ObjectTree.decode(tree, objects, tree.getObjectId());
        ObjectTree.Encoded enc = ObjectTree.encodeMessage(d.metadata, d.content, d.error);
        Map<String, Object> out = new LinkedHashMap<>();
        out.put("root", enc.rootId);
        out.put("ids", new java.util.ArrayList<>(enc.objects.keySet()));
        System.out.println(Json.dumps(out));
    }
}
