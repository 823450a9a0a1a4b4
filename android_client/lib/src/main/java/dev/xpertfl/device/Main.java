package dev.xpertfl.device;

import dev.xpertfl.fleet.FleetClient;
import dev.xpertfl.fleet.FleetNode;
import dev.xpertfl.fleet.Json;
import java.io.File;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.atomic.AtomicBoolean;

/**
 * The XPerT device as a JVM SuperNode (what the integration test runs; the Android app wraps the same
 * classes). Training is the {@link NoOpTrainer}: this command line does not fine-tune.
 *
 * <pre>
 * java -jar build/xpert-fleet.jar --superlink 127.0.0.1:9092 --user jvm-0 \
 *      --embedding drift.json --initial-adapter path/to/peft_adapter_dir [--label poetic]
 * </pre>
 * {@code drift.json}: {"vector": [...d floats...], "summarizer": "fingerprint or null"} (a drift
 * embedding computed elsewhere: on the JVM there is no summarizer) or use {@code --coordinate c1,c2,..}.
 * Each handled message prints one line {@code XPERT-OUTCOME {json}} on stdout.
 */
public final class Main {
    private Main() {}

    public static void main(String[] argv) throws Exception {
        System.setProperty("java.util.logging.SimpleFormatter.format", "%1$tT %4$s %3$s: %5$s%6$s%n");
        Map<String, String> a = new LinkedHashMap<>();
        for (int i = 0; i < argv.length; i++) {
            if (!argv[i].startsWith("--") || i + 1 >= argv.length) usage("bad argument " + argv[i]);
            a.put(argv[i].substring(2), argv[++i]);
        }
        String superlink = req(a, "superlink");
        double[] embedding = null;
        String summarizer = null;
        double[] coordinate = null;
        if (a.containsKey("embedding")) {
            Object doc = Json.parse(new String(Files.readAllBytes(new File(a.get("embedding")).toPath()), StandardCharsets.UTF_8));
            Object vec = doc instanceof Map ? ((Map<?, ?>) doc).get("vector") : doc;
            if (doc instanceof Map && ((Map<?, ?>) doc).get("summarizer") instanceof String) summarizer = (String) ((Map<?, ?>) doc).get("summarizer");
            embedding = toDoubles((List<?>) vec);
        } else if (a.containsKey("coordinate")) {
            String[] parts = a.get("coordinate").split(",");
            coordinate = new double[parts.length];
            for (int i = 0; i < parts.length; i++) coordinate[i] = Double.parseDouble(parts[i].trim());
        } else {
            usage("give --embedding FILE or --coordinate c1,c2,...");
        }
        Adapter initial = Adapter.loadPeftDir(new File(req(a, "initial-adapter")));
        XpertDevice device = new XpertDevice(new XpertDevice.Profile(req(a, "user"), a.get("label"), embedding, summarizer, coordinate),
                new NoOpTrainer(initial));
        FleetClient client = new FleetClient(superlink, null, Integer.parseInt(a.getOrDefault("timeout-ms", "30000")), "SuperNode");
        long maxMessages = Long.parseLong(a.getOrDefault("max-messages", "0"));
        long poll = Long.parseLong(a.getOrDefault("poll-ms", "1000"));
        AtomicBoolean stop = new AtomicBoolean(false);
        try (FleetNode node = new FleetNode(client, Double.parseDouble(a.getOrDefault("heartbeat", "30")))) {
            Runtime.getRuntime().addShutdownHook(new Thread(() -> {
                stop.set(true);
                node.close();
            }));
            connect(node);
            System.out.println("XPERT-NODE " + Long.toUnsignedString(node.nodeId()));
            System.out.flush();
            long handled = 0;
            while (!stop.get() && (maxMessages == 0 || handled < maxMessages)) {
                FleetNode.Outcome o;
                try {
                    o = node.pollOnce(device);
                } catch (java.io.IOException e) {
                    System.err.println("fleet call failed: " + e.getMessage() + "; retrying");
                    Thread.sleep(Math.max(poll, 1000));
                    continue;
                }
                if (o == null) {
                    Thread.sleep(poll);
                    continue;
                }
                handled++;
                Map<String, Object> line = new LinkedHashMap<>();
                line.put("type", o.messageType);
                line.put("error", o.error);
                line.put("bytes_down", o.bytesDown);
                line.put("bytes_up", o.bytesUp);
                line.put("seconds", o.seconds);
                line.put("status", device.lastStatus);
                System.out.println("XPERT-OUTCOME " + Json.dumps(line));
                System.out.flush();
            }
        }
    }

    /** The SuperLink may still be starting: retry the connection for a while. */
    private static void connect(FleetNode node) throws Exception {
        for (int attempt = 0; ; attempt++) {
            try {
                node.connect();
                return;
            } catch (java.io.IOException e) {
                if (attempt >= 30) throw e;
                Thread.sleep(1000);
            }
        }
    }

    private static double[] toDoubles(List<?> l) {
        double[] out = new double[l.size()];
        for (int i = 0; i < out.length; i++) out[i] = ((Number) l.get(i)).doubleValue();
        return out;
    }

    private static String req(Map<String, String> a, String k) {
        String v = a.get(k);
        if (v == null) usage("missing --" + k);
        return v;
    }

    private static void usage(String why) {
        System.err.println(why + "\nusage: --superlink HOST:PORT --user ID [--label L] (--embedding FILE | --coordinate c1,c2,..) "
                + "--initial-adapter PEFT_DIR [--heartbeat S] [--poll-ms MS] [--max-messages N] [--timeout-ms MS]");
        System.exit(2);
    }
}
